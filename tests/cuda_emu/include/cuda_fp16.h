// The CUDA header of this name, emulated on the CPU: see ../emu.h.
#pragma once
#include "../emu.h"
