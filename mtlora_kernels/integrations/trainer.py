"""``transformers.Trainer`` with mtLoRA's auxiliary loss (balance + spectral) in training.

Attach the adapters first, then train as usual::

    handle = attach(model, MTLoRAConfig(), placement="ffn")
    trainer = MTLoRATrainer(model=model, args=args, train_dataset=ds)
    trainer.train()
    save_adapters(handle, "adapters/")

(:class:`MTLoRASeq2SeqTrainer` the same on ``Seq2SeqTrainer``, for an encoder-decoder evaluated
by generation.)

Adding ``handle.aux_loss()`` to the loss in a ``compute_loss`` override is easy to get subtly
wrong, which is why this class exists:

- **Gradient accumulation.** When the model normalizes its loss over the whole accumulated batch
  (``num_items_in_batch``, transformers' default for causal LMs), the Trainer does not divide the
  loss by the accumulation steps; a per-micro-batch auxiliary term added to it would then count
  once per micro-batch, k times too much. Here the term is divided by the steps in that case and
  left to the Trainer's own division otherwise: each optimizer step takes the mean of the term
  over its micro-batches either way.
- **The regularizer's step.** One :class:`~mtlora_kernels.losses.SpectralRegularizer` serves the
  whole run (its cached weighting and its ``apply_every`` schedule) and is called with the
  optimizer step (``state.global_step``), not a count of micro-batches.
- **Padding.** The batch's ``attention_mask`` goes to the balance loss, so padding tokens do
  not count; an encoder-decoder's decoder adapters (T5's) take ``decoder_attention_mask``, or
  where the batch has none, the positions of its labels (``labels != -100``). An audio model's
  ``attention_mask`` counts raw samples or input frames: the mask of the frames its layers see
  goes instead, computed by the model's own rule (:func:`frame_mask`: the wav2vec 2.0 family,
  SEW, SEW-D, Speech2Text, Moonshine; Qwen2-Audio's audio tower from the batch's
  ``feature_attention_mask``; Whisper's encoder and Voxtral's audio tower read no mask, their
  frames all count).
- **Evaluation** reports the task loss alone: the term is added only while the model trains.
- **Quantized bases** (bitsandbytes): the Trainer refuses a quantized model unless PEFT's
  adapters are on it; mtLoRA's adapters pass that check here.
- **Checkpoints** hold the regularizer's run state (its step, last refresh and cached
  weighting: ``mtlora_regularizer.pt``, written by ``save_model``), which
  ``train(resume_from_checkpoint=...)`` restores into the regularizer the trainer is given:
  with ``refresh_every`` > 1 a resumed run weighs as the uninterrupted one does. A ``train()``
  that resumes nothing starts the regularizer afresh (:meth:`SpectralRegularizer.reset`).
  They also describe the adapters (``mtlora_adapters.json``), and a resume into other adapters
  (config, placement, layers, adapted modules, train modules) raises
  :class:`~mtlora_kernels.io.AdapterLoadError` before loading: the Trainer's own load is
  non-strict.

The class is built on the installed transformers' ``Trainer`` (this module imports it; the rest
of the package does not); tested with transformers 5.25.0, 5.17.0 and 4.57.6.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn
from transformers.trainer_utils import get_last_checkpoint

from mtlora_kernels.integrations.hf import MTLoRAHandle, get_handle
from mtlora_kernels.io import _check_same_adapters, _meta_text, _read_json
from mtlora_kernels.losses import SpectralRegularizer, is_encoder_decoder


# The file beside a saved model (each checkpoint's) that holds the regularizer's run state; its
# settings come from the regularizer the resumed trainer is given.
REGULARIZER_NAME = "mtlora_regularizer.pt"
# The file beside a saved model that describes its adapters (save_adapters' adapter_config.json,
# by another name: transformers reads that one as a PEFT adapter's); a resume checks it.
ADAPTERS_NAME = "mtlora_adapters.json"
_RUN_STATE = ("step", "_refreshed_at", "_weighting")
# The batch's mask over the adapted model's input positions where it is not the batch's
# attention_mask: Qwen2-Audio's audio tower (adapters attached to ``model.model.audio_tower``)
# reads the mel frames that ``feature_attention_mask`` marks (the attention_mask is the text's).
_MASK_KEYS = {"qwen2_audio_encoder": "feature_attention_mask"}


def _the_handle(model: nn.Module) -> MTLoRAHandle:
    """The handle of the adapters attached to ``model`` or to one of its submodules (a dual
    encoder's ``vision_model``); one, whose auxiliary loss the trainer adds."""
    found = [(name or "the model itself", handle) for name, module in model.named_modules()
             if (handle := get_handle(module)) is not None]
    if not found:
        raise ValueError("MTLoRATrainer: the model has no mtLoRA adapters; attach them "
                         "(mtlora_kernels.attach(model, config, ...)) before building the "
                         "trainer")
    if len(found) > 1:
        raise ValueError(f"MTLoRATrainer: adapters attached {len(found)} times, to "
                         f"{', '.join(name for name, _ in found)}; the trainer adds the "
                         f"auxiliary loss of one attach: attach once, to the module that "
                         f"holds every layer to adapt")
    return found[0][1]


_UNSET = object()


@contextlib.contextmanager
def _adapters_on_quantized_base(model: nn.Module | None):
    """Inside it, transformers' ``Trainer.__init__`` takes a quantized model (bitsandbytes
    4-bit, 8-bit) that has mtLoRA adapters. Its check refuses a quantized model unless PEFT's
    adapters are on it (it reads the model's ``_hf_peft_config_loaded``, which only PEFT's own
    loading sets): "You cannot perform fine-tuning on purely quantized models". The flag is set
    for the check alone, where the model has adapters, and refused as the Trainer would where
    the quantization method does not train (``hf_quantizer.is_trainable``)."""
    if model is None or not getattr(model, "is_quantized", False):
        yield
        return
    _the_handle(model)  # refused if it has no adapters
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or not quantizer.is_trainable:
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
        method = getattr(method, "value", method)  # transformers' QuantizationMethod, a str enum
        raise ValueError(f"MTLoRATrainer: the model is quantized with {method}, which "
                         f"transformers does not train through (hf_quantizer.is_trainable is "
                         f"False)")
    saved = vars(model).get("_hf_peft_config_loaded", _UNSET)
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if saved is _UNSET:
            del model._hf_peft_config_loaded
        else:
            model._hf_peft_config_loaded = saved


def _read_as_bool(mask: Tensor | None) -> Tensor | None:
    """A batch's mask as the model reads it (nonzero: the position counts), bool: the balance
    loss then checks none of its values, a host read that would sync with the device at every
    step (the model itself reads the same mask)."""
    return None if mask is None else mask != 0


class MTLoRATrainer(transformers.Trainer):
    """``transformers.Trainer`` that adds ``balance_weight * balance loss + spectral_weight *
    regularizer`` (:func:`mtlora_kernels.losses.auxiliary_loss`) to the training loss.

    Args (keyword, besides the Trainer's own): ``balance_weight`` (default 0.01) and
    ``spectral_weight`` (default 1.0), the released scripts' weights; ``regularizer``, the
    :class:`SpectralRegularizer` for the run (default: the paper variant, every step). The model,
    or one of its submodules (a dual encoder's ``vision_model``), must have adapters attached,
    once (:func:`mtlora_kernels.attach`, or a loader that attaches).
    The logs carry ``aux_loss``, the term of the last micro-batch before each log. The
    Trainer's optimizer takes every parameter that needs grad: the adapters, and the modules
    ``attach(..., train_modules=...)`` named (a task head).
    """

    def __init__(self, *args, balance_weight: float = 0.01, spectral_weight: float = 1.0,
                 regularizer: SpectralRegularizer | None = None, **kwargs) -> None:
        with _adapters_on_quantized_base(kwargs.get("model", args[0] if args else None)):
            super().__init__(*args, **kwargs)
        self._handle = (self.model, _the_handle(self.model))  # refused now if it has none
        self.balance_weight = float(balance_weight)
        self.spectral_weight = float(spectral_weight)
        self.regularizer = regularizer if regularizer is not None else SpectralRegularizer()
        self._last_aux = None  # a tensor: no device sync per step, only per log

    @property
    def mtlora_handle(self) -> MTLoRAHandle:
        """The handle of the adapters on the model being trained: ``model_init`` builds the
        model anew at ``train()`` (a hyper-parameter search, each trial), with adapters of its
        own."""
        if self._handle[0] is not self.model:
            self._handle = (self.model, _the_handle(self.model))
        return self._handle[1]

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether ``training_step`` will leave the loss undivided by the accumulation steps
        (the Trainer's own rule; ``loss_is_scaled_for_ga`` is its override where it has one)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # before the Trainer may pop anything
        adapted = self.mtlora_handle.model
        key = _MASK_KEYS.get(getattr(getattr(adapted, "config", None), "model_type", None),
                             "attention_mask")
        mask = _read_as_bool(frame_mask(adapted, inputs.get(key)))
        # The decoder's tokens where the adapters sit in an encoder-decoder (T5's): the labels'
        # positions, unless the batch gives their mask (adapters on its encoder alone: none).
        decoder_mask = None
        if is_encoder_decoder(adapted):
            decoder_mask = _read_as_bool(inputs.get("decoder_attention_mask"))
            if decoder_mask is None and inputs.get("labels") is not None:
                decoder_mask = inputs["labels"] != -100
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training:
            aux = self.mtlora_handle.aux_loss(
                balance_weight=self.balance_weight, spectral_weight=self.spectral_weight,
                regularizer=self.regularizer, mask=mask, decoder_mask=decoder_mask,
                step=self.state.global_step)
            self._last_aux = aux.detach()
            if self._loss_scaled_for_accumulation(num_items_in_batch):
                # The steps of this optimizer step (the last one of an epoch may have fewer).
                aux = aux / getattr(self, "current_gradient_accumulation_steps",
                                    self.args.gradient_accumulation_steps)
            loss = loss + aux
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's, and the regularizer's run state beside the model (each checkpoint's
        folder holds it: the Trainer saves a checkpoint's model through this method)."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            # Made here too: under FSDP with a sharded state dict the Trainer's save_model writes
            # nothing, and the checkpoint's folder comes later (with the model's shards).
            directory = self.args.output_dir if output_dir is None else output_dir
            os.makedirs(directory, exist_ok=True)
            state = self.regularizer.__getstate__()
            torch.save({key: state[key] for key in _RUN_STATE},
                       os.path.join(directory, REGULARIZER_NAME))
            Path(directory, ADAPTERS_NAME).write_text(
                _meta_text(self.mtlora_handle, self.mtlora_handle.model))

    def _load_from_checkpoint(self, resume_from_checkpoint, *args, **kwargs):
        """The Trainer's, after checking that the checkpoint's adapters are the model's: the
        Trainer loads the model's state dict non-strictly (missing and unexpected keys are only
        logged), so adapters of another placement or layers trained on with fresh weights and
        the optimizer state of others (of other shapes: a crash in the optimizer), and another
        alpha went unseen. A checkpoint without the file (another trainer's) is not checked."""
        saved = Path(resume_from_checkpoint) / ADAPTERS_NAME
        if saved.is_file():
            _check_same_adapters(_read_json(saved), self.mtlora_handle, saved)
        return super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """The Trainer's; resuming from a checkpoint restores the regularizer's run state too
        (without it, a run with ``refresh_every`` > 1 refreshed the weighting at its first
        step and drifted from the uninterrupted one). Otherwise the regularizer starts afresh,
        as the Trainer's step does: a second ``train()`` kept the first run's state, and with
        ``refresh_every`` > 1 weighed its first steps by the first run's weights."""
        self.regularizer.reset()
        path = resume_from_checkpoint
        if path is True:  # the Trainer's rule: the last checkpoint in output_dir
            path = get_last_checkpoint(self.args.output_dir)
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(
                saved := os.path.join(path, REGULARIZER_NAME)):  # another trainer's has none
            run = torch.load(saved, map_location="cpu", weights_only=True)
            self.regularizer.__setstate__({**self.regularizer.__getstate__(), **run})
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._last_aux is not None:
            logs["aux_loss"] = round(float(self._last_aux), 6)
        super().log(logs, *args, **kwargs)


def frame_mask(model: nn.Module, mask: Tensor | None) -> Tensor | None:
    """The mask of the positions ``model``'s layers see, from its batch's ``attention_mask``
    (None: every position counts). An audio model's mask counts raw samples or input frames,
    of which its feature encoder makes fewer frames; there this is the mask the model computes
    for its layers, by its own rule:

    - the wav2vec 2.0 family and Speech2Text: the model's ``_get_feature_vector_attention_mask``;
    - SEW and SEW-D: that mask, pooled again by ``squeeze_factor`` as their encoder pools the
      frames; a window counts where any of its frames does (transformers 5's rule; 4.x counts
      the whole windows only, one window fewer where a sequence ends inside one);
    - Moonshine: one sample per frame, at the product of its convolutions' strides;
    - Qwen2-Audio's audio tower (qwen2_audio_encoder, ``model.model.audio_tower``): ``mask``
      is the batch's ``feature_attention_mask`` over the mel frames (the trainer hands that one
      on), and the tower's frames count up to the length its stride-2 convolution makes of the
      real ones, the rule by which Qwen2-Audio masks the tower's layers;
    - Whisper and Voxtral's audio tower (voxtral_encoder): None, as their encoder is given no
      mask (its layers attend to every frame).

    Any other model: ``mask`` itself."""
    if mask is None:
        return None
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in ("whisper", "voxtral_encoder"):
        return None
    lengths = getattr(model, "_get_feat_extract_output_lengths", None)
    if kind == "qwen2_audio_encoder":  # lengths: (after the convolutions, after the pooling)
        real = lengths(mask.sum(-1))[0]
        frames = torch.arange(lengths(mask.shape[-1])[0], device=mask.device)
        return frames < real.unsqueeze(-1)
    if kind == "moonshine":
        convs = [m for m in model.get_encoder().modules() if isinstance(m, nn.Conv1d)]
        stride = math.prod(conv.stride[0] for conv in convs)
        return mask[..., ::stride][..., :int(lengths(mask.shape[-1]))]
    derive = getattr(model, "_get_feature_vector_attention_mask", None)
    if derive is None or lengths is None:
        return mask
    frames = derive(int(lengths(mask.shape[-1])), mask)
    squeeze = getattr(model.config, "squeeze_factor", 1)
    if squeeze > 1:
        pooled = nn.functional.max_pool1d(frames.float().unsqueeze(1), squeeze, squeeze)
        frames = pooled.squeeze(1).to(frames.dtype)
    return frames


class MTLoRASeq2SeqTrainer(MTLoRATrainer, transformers.Seq2SeqTrainer):
    """:class:`MTLoRATrainer` on ``transformers.Seq2SeqTrainer``: the same auxiliary loss in
    training, and an encoder-decoder's (T5's) evaluation and prediction by generation
    (``Seq2SeqTrainingArguments(predict_with_generate=True)``), through the adapters."""


__all__ = ["MTLoRATrainer", "MTLoRASeq2SeqTrainer", "frame_mask"]
