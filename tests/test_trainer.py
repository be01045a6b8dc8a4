"""MTLoRATrainer (mtlora_kernels.integrations.trainer): transformers' Trainer with the auxiliary
loss, on a tiny LLaMA built from a config, on the CPU."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer's own requirement

from conftest import rel_err  # noqa: E402
from test_distributed import run_on_two_ranks  # noqa: E402
from test_hf import (AUDIO_INPUTS, AUDIO_LANGUAGE, audio_language_model, fill,  # noqa: E402
                     randomize, tiny_model)
from mtlora_kernels import MTLoRAConfig, attach  # noqa: E402
from mtlora_kernels.integrations.layouts import SUPPORTED_ARCHITECTURES  # noqa: E402
from mtlora_kernels.integrations.trainer import (ADAPTERS_NAME, REGULARIZER_NAME,  # noqa: E402
                                                 MTLoRATrainer, frame_mask)
from mtlora_kernels.losses import (SpectralRegularizer, auxiliary_loss,  # noqa: E402
                                   spectral_weighting)


def tiny_adapted(placement: dict | None = None, family: str = "llama", **config):
    """test_hf's tiny LLaMA (or ``family``'s model, with ``config``), with adapters at
    ``placement`` drawn at random (B = 0 at init: every term then has a gradient)."""
    model = tiny_model(family, **config)
    if placement is None:
        return model, None
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.0), **placement)
    randomize(handle)
    return model, handle


def dataset(n: int = 8, length: int = 9, seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def args(tmp_path, **kw) -> transformers.TrainingArguments:
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                logging_steps=1, disable_tqdm=True, seed=0, max_grad_norm=0.0, weight_decay=0.0,
                optim="sgd", learning_rate=1.0, lr_scheduler_type="constant")
    return transformers.TrainingArguments(**{**base, **kw})


class _Recording(MTLoRATrainer):
    """Keeps the ``input_ids`` rows of every training micro-batch it is given; samples the rows
    in order (``train_sampling_strategy="sequential"`` of transformers 5, by the sampler hook that
    transformers 4.57 has too)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen += inputs["input_ids"].tolist()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        data = self.train_dataset if train_dataset is None else train_dataset
        return torch.utils.data.SequentialSampler(data)


def one_step_update(out_dir, n: int, micro: int, accumulate: int, normalized: bool = True,
                    spectral_weight: float = 5.0, placement: dict | None = None
                    ) -> tuple[list[torch.Tensor], list]:
    """One SGD step over ``dataset(n)`` (micro-batches of ``micro`` per process, ``accumulate``
    of them; adapters at ``placement``, default block-level FFN): the update of every adapter
    parameter, and the rows this process trained on. The sampler is sequential, so that no
    seed decides which rank gets which rows."""
    model, handle = tiny_adapted(placement or dict(placement="ffn"))
    before = [p.detach().clone() for p in handle.parameters()]
    trainer = _Recording(
        model=model, train_dataset=dataset(n), balance_weight=0.0,
        spectral_weight=spectral_weight,
        args=args(out_dir, max_steps=1, per_device_train_batch_size=micro,
                  gradient_accumulation_steps=accumulate))
    trainer.model_accepts_loss_kwargs = normalized
    trainer.train()
    return [p.detach() - b for p, b in zip(handle.parameters(), before)], trainer.seen


@pytest.mark.parametrize("family,config", [("llama", {}), ("opt", dict(dropout=0.0))])
def test_the_training_loss_is_the_task_loss_plus_the_auxiliary_loss(tmp_path, family, config):
    """The trainer's loss is the model's plus auxiliary_loss with the batch's attention_mask
    (OPT's FFN adapters see the tokens flattened, [B*S, d]: the mask fits them too)."""
    model, handle = tiny_adapted(dict(placement="both"), family, **config)
    trainer = MTLoRATrainer(model=model, args=args(tmp_path), train_dataset=dataset(),
                            balance_weight=0.3, spectral_weight=0.7)
    batch = {k: torch.tensor([r[k] for r in dataset(3, seed=5)])
             for k in ("input_ids", "attention_mask", "labels")}
    batch["attention_mask"][0, -3:] = 0  # padding: the balance loss must leave it out
    model.train()
    ours = trainer.compute_loss(model, dict(batch))
    task = model(**batch).loss
    want = task + auxiliary_loss(model, balance_weight=0.3, spectral_weight=0.7,
                                 mask=batch["attention_mask"])
    assert rel_err(ours, want) <= 1e-6
    assert rel_err(ours, task) > 1e-3, "the auxiliary term must count"
    model.eval()
    assert rel_err(trainer.compute_loss(model, dict(batch)), model(**batch).loss) <= 1e-6


def test_an_audio_models_balance_term_counts_the_frames_its_layers_see(tmp_path):
    """wav2vec 2.0 (CTC) on a padded batch of raw audio: its attention_mask counts samples, its
    layers and adapters see the feature encoder's frames (160 samples make 18 of them: kernels 8
    and 4, strides 4 and 2). The trainer's balance term counts the frames of the real samples,
    as many as the convolutions make of them, and the loss is the task's plus that term. (The
    samples' mask, passed on as it was, failed on the frames' shape.)"""
    model = tiny_model("wav2vec2", ctc_loss_reduction="mean", hidden_dropout=0.0,
                       attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                       final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, pad_token_id=0)
    model = transformers.Wav2Vec2ForCTC(model.config)
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.0),
                    placement="both")
    randomize(handle)
    g = torch.Generator().manual_seed(6)
    samples = torch.randn(2, 160, generator=g)
    mask = torch.ones(2, 160, dtype=torch.long)
    mask[0, 100:] = 0  # 100 real samples: (100 - 8) // 4 + 1 = 24, (24 - 4) // 2 + 1 = 11 frames
    samples[0, 100:] = 0.0
    batch = dict(input_values=samples, attention_mask=mask,
                 labels=torch.randint(1, 16, (2, 3), generator=g))
    frames = torch.zeros(2, 18, dtype=torch.long)
    frames[0, :11] = 1
    frames[1, :] = 1
    trainer = MTLoRATrainer(model=model, args=args(tmp_path), train_dataset=dataset(),
                            balance_weight=0.3, spectral_weight=0.0)
    model.train()
    ours = trainer.compute_loss(model, dict(batch))
    task = model(**batch).loss
    want = task + auxiliary_loss(model, balance_weight=0.3, spectral_weight=0.0, mask=frames)
    assert rel_err(ours, want) <= 1e-6
    unmasked = task + auxiliary_loss(model, balance_weight=0.3, spectral_weight=0.0)
    assert rel_err(ours, unmasked) > 1e-6, "the padding's frames must not count"


def attended(layer_mask, batch: int, positions: int) -> torch.Tensor:
    """The positions a layer attends to, read from the attention mask the model called it with:
    None (every position), a [B, S] mask, or a [B, 1, Q or 1, S] one (bool or integer: nonzero
    attends; float: additive, 0 attends); a padding mask's rows agree, so its first row."""
    if layer_mask is None:
        return torch.ones(batch, positions, dtype=torch.bool)
    keys = layer_mask if layer_mask.dim() == 2 else layer_mask[:, 0, 0, :]
    return keys == 0 if keys.is_floating_point() else keys != 0


# family -> the samples or input frames of its first sequence that are real (of AUDIO_INPUTS's)
AUDIO_PADDED = {"wav2vec2": 100, "data2vec-audio": 100, "sew": 100, "sew-d": 120,
                "speech_to_text": 9, "moonshine": 500, "whisper": 10}


@pytest.mark.parametrize("family", sorted(AUDIO_PADDED))
def test_the_frame_mask_is_the_mask_the_models_layers_attend_by(family):
    """frame_mask gives the balance loss the positions the audio model's adapted layers attend
    to on a padded batch: the mask the model hands its first such layer, read from that call
    (each model derives it by a rule of its own; SEW and SEW-D pool the frames again, Moonshine
    samples them at its convolutions' stride, Whisper's encoder reads none). The batch's mask
    of samples or input frames, passed on as it was, failed for all of them."""
    model = tiny_model(family)
    name, shape = AUDIO_INPUTS[family]
    length = shape[1] if family == "speech_to_text" else shape[-1]
    mask = torch.ones(shape[0], length, dtype=torch.long)
    mask[0, AUDIO_PADDED[family]:] = 0
    inputs = {name: torch.randn(shape, generator=torch.Generator().manual_seed(3)),
              "attention_mask": mask}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.ones(shape[0], 3, dtype=torch.long)
    layouts = SUPPORTED_ARCHITECTURES[model.config.model_type]
    classes = {layout.layer_class for layout in (
        layouts if isinstance(layouts, tuple) else (layouts,))}
    first = next(m for m in model.modules() if type(m).__name__ in classes)
    seen = {}

    def keep(module, args, kwargs):
        seen["z"] = args[0] if args else kwargs["hidden_states"]
        seen["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    hook = first.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    batch, positions = seen["z"].shape[:2]
    want = attended(seen["mask"], batch, positions)
    assert not want[0].all() or family == "whisper", "the padding must reach the layers"
    ours = frame_mask(model, mask)
    ours = torch.ones(batch, positions, dtype=torch.bool) if ours is None else ours.bool()
    assert torch.equal(ours, want)


@pytest.mark.parametrize("family", AUDIO_LANGUAGE)
def test_an_audio_towers_balance_term_counts_the_frames_its_layers_see(tmp_path, family):
    """Adapters on an audio-language model's audio tower (``model.model.audio_tower``) on a
    padded batch: the trainer's balance term counts the tower frames its first layer attends
    to. Qwen2-Audio masks them by the batch's feature_attention_mask (over the mel frames; the
    second clip has 10 of 16, 5 of the tower's 8 frames); Voxtral gives its tower no mask. The
    batch's attention_mask, the text's (9 tokens), went to the tower's adapters before, and the
    balance loss failed on its shape."""
    model = audio_language_model(family)
    handle = attach(model.model.audio_tower, MTLoRAConfig(r=2, num_experts=3, groups=2,
                                                          dropout=0.0), placement="both")
    randomize(handle)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 60, (2, 9), generator=g)
    ids[:, 1:3] = 63  # the audio's tokens: Voxtral's clips make 4 in all, Qwen2-Audio's 4 and 2
    text_mask = torch.ones(2, 9, dtype=torch.long)
    text_mask[1, 7:] = 0
    batch = dict(input_ids=ids, attention_mask=text_mask, labels=ids.clone(),
                 input_features=torch.randn(2, 8, 16, generator=g))
    if family == "qwen2_audio":
        ids[0, 3:5] = 63
        batch["feature_attention_mask"] = torch.ones(2, 16, dtype=torch.long)
        batch["feature_attention_mask"][1, 10:] = 0
    seen = {}

    def keep(module, args, kwargs):
        seen["z"] = args[0] if args else kwargs["hidden_states"]
        seen["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    first = next(m for m in model.model.audio_tower.modules()
                 if type(m).__name__.endswith("EncoderLayer"))
    first.register_forward_pre_hook(keep, with_kwargs=True)
    trainer = MTLoRATrainer(model=model, args=args(tmp_path), train_dataset=dataset(),
                            balance_weight=0.3, spectral_weight=0.0)
    model.train()
    ours = trainer.compute_loss(model, dict(batch))
    frames = attended(seen["mask"], *seen["z"].shape[:2])
    assert frames[1].sum() == (5 if family == "qwen2_audio" else 8) and frames[0].all()
    want = model(**batch).loss + auxiliary_loss(handle.model, balance_weight=0.3,
                                                spectral_weight=0.0, mask=frames)
    assert rel_err(ours, want) <= 1e-6


@pytest.mark.parametrize("placement,normalized", [
    (dict(placement="ffn"), True), (dict(target_modules="q_proj,v_proj"), True),
    (dict(placement="ffn"), False)], ids=["block", "component", "block-mean-loss"])
def test_gradient_accumulation_gives_the_update_of_one_large_batch(tmp_path, placement,
                                                                   normalized):
    """One optimizer step over 4 sequences, as 2 micro-batches of 2 or one batch of 4: the same
    SGD update of every adapter parameter. The spectral term counts once per step either way:
    added as it is to each micro-batch's causal-LM loss, which transformers normalizes over the
    whole accumulated batch (``normalized``), it counted twice; where the Trainer divides the
    loss by the accumulation steps itself (a model that takes no loss kwargs: per-micro-batch
    means), it must not be divided again. The balance term is left out: a mean over
    micro-batches of var/mean^2 is not that of the whole batch."""
    updates = [one_step_update(tmp_path / f"{micro}x{accumulate}", 4, micro, accumulate,
                               normalized, placement=placement)[0]
               for micro, accumulate in ((4, 1), (2, 2))]
    for one, accumulated in zip(*updates):
        assert one.abs().max() > 0
        assert rel_err(accumulated, one) <= 1e-5


def test_a_shorter_last_accumulation_window_divides_by_its_own_steps(tmp_path):
    """An epoch of one micro-batch under gradient_accumulation_steps=2: its optimizer step has
    one micro-batch, so the auxiliary term is divided by 1 (the Trainer's
    ``current_gradient_accumulation_steps``), as without accumulation, not by 2."""
    updates = [one_step_update(tmp_path / f"2x{accumulate}", 2, 2, accumulate)[0]
               for accumulate in (1, 2)]
    for one, accumulated in zip(*updates):
        assert one.abs().max() > 0
        assert rel_err(accumulated, one) <= 1e-5


# name, sequences (one optimizer step over all of them), per-rank micro-batch, accumulation
# steps, whether the causal-LM loss is normalized over the whole batch (num_items_in_batch).
DDP_CASES = [("ddp", 4, 2, 1, True), ("ddp-accumulate", 8, 2, 2, True),
             ("ddp-accumulate-mean-loss", 8, 2, 2, False)]


def _ddp_worker(rank: int, port: int, out_dir: str, cases) -> None:
    """Trains each case on this rank (the Trainer's own DDP: accelerate, CPU, gloo, from the
    environment a launcher sets) and saves its update and rows; the checks are the parent's."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=120))
    try:
        for name, n, micro, accumulate, normalized in cases:
            Path(out_dir, f"rank{rank}.stage").write_text(name)
            update, seen = one_step_update(Path(out_dir, name), n, micro, accumulate, normalized)
            torch.save({"update": update, "seen": seen}, Path(out_dir, f"{name}.rank{rank}.pt"))
        Path(out_dir, f"rank{rank}.passed").touch()
        dist.barrier()  # neither rank tears down while the other still communicates
    finally:
        dist.destroy_process_group()


def test_data_parallel_training_gives_the_update_of_one_process(tmp_path):
    """One optimizer step over 4 sequences as 2 ranks x 2 (the Trainer's DDP) or 1 process x 4,
    and over 8 as 2 ranks x 2 micro-batches x 2: the same SGD update of every adapter parameter.
    The Trainer multiplies the causal-LM loss by the number of processes (it is normalized over
    the tokens of all ranks, and DDP averages the gradients); the auxiliary term, the same on
    every rank, is not multiplied, and DDP's average leaves it counted once, as in one process.
    Without num_items_in_batch (``mean-loss``) nothing is multiplied and the per-rank means
    average to the whole batch's (equal token counts). The balance term is left out: each rank's
    var/mean^2 over its own tokens, averaged, is not that of the whole batch."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available on this platform")
    # Spawned, not forked: a fork of the test process (its thread pools, the CUDA emulator's
    # library) risks a hang for ~14 s saved on a 2-core machine.
    run_on_two_ranks(_ddp_worker, tmp_path, DDP_CASES)
    worst, reference = {}, {}
    for name, n, micro, accumulate, normalized in DDP_CASES:
        ranks = [torch.load(tmp_path / f"{name}.rank{r}.pt") for r in range(2)]
        # Each sequence on exactly one rank: the two ranks' rows are the dataset (the sequential
        # sampler gives rank 0 rows 0-1, then 4-5 when accumulating; rank 1 rows 2-3, 6-7).
        assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == sorted(
            row["input_ids"] for row in dataset(n)), name
        one = reference[name] = one_step_update(tmp_path / f"{name}-one", n, n, 1, normalized)[0]
        assert all(want.abs().max() > 0 for want in one)
        worst[name] = max(rel_err(got, want) for rank in ranks
                          for got, want in zip(rank["update"], one, strict=True))
    assert all(err <= 1e-5 for err in worst.values()), f"rel. error of the update: {worst}"
    # The term matters: counted twice (once per rank), the update would be off by far more.
    twice, _ = one_step_update(tmp_path / "twice", 4, 4, 1, spectral_weight=10.0)
    assert max(rel_err(a, b) for a, b in zip(twice, reference["ddp"])) > 1e-2


def test_training_runs_logs_the_term_and_calls_the_regularizer_with_the_optimizer_step(tmp_path):
    model, handle = tiny_adapted(dict(target_modules="q_proj,v_proj"))
    steps = []

    class Recording(SpectralRegularizer):
        def __call__(self, model, step=None):
            steps.append(step)
            return super().__call__(model, step)

    trainer = MTLoRATrainer(
        model=model, train_dataset=dataset(8), regularizer=Recording(),
        args=args(tmp_path, max_steps=3, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, learning_rate=1e-3))
    trainer.train()
    assert steps == [0, 0, 1, 1, 2, 2]  # each micro-batch, with its optimizer step
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(entry["aux_loss"] > 0 for entry in logged)


def test_the_trainer_trains_the_train_modules_too(tmp_path):
    """attach(..., train_modules="lm_head"): one MTLoRATrainer step moves the adapters and the
    head, and nothing else (the Trainer's optimizer takes what needs grad)."""
    model, handle = tiny_adapted(dict(placement="ffn", train_modules="lm_head"))
    fill(model.lm_head, 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MTLoRATrainer(model=model, train_dataset=dataset(4), balance_weight=0.1,
                            args=args(tmp_path, max_steps=1, per_device_train_batch_size=4,
                                      learning_rate=0.1))
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "lm_head.weight" in changed
    assert changed == {n for n, _ in handle.named_parameters()}


def test_a_model_built_by_model_init_trains_its_own_adapters(tmp_path):
    """With ``model_init`` the Trainer builds the model anew at train(): the auxiliary loss is
    that model's adapters' (it was the first model's, whose adapters ran no forward: the balance
    loss failed at the first step), and training moves them."""
    built, initial = [], []

    def model_init():
        built.append(tiny_adapted(dict(placement="ffn"))[1])
        initial[:] = [p.detach().clone() for p in built[-1].parameters()]
        return built[-1].model

    trainer = MTLoRATrainer(model_init=model_init, args=args(tmp_path, max_steps=2),
                            train_dataset=dataset(4))
    trainer.train()
    assert len(built) == 2 and trainer.mtlora_handle is built[-1]
    assert built[-1].model is trainer.model
    assert all(not torch.equal(p, q) for p, q in zip(built[-1].parameters(), initial))


def test_adapters_attached_to_a_submodule_are_found_and_two_attaches_refused(tmp_path):
    """attach() on a submodule (here the LLaMA body, as on a dual encoder's vision_model): the
    trainer adds that handle's auxiliary loss; a second attach elsewhere is named."""
    model = tiny_model("llama")
    handle = attach(model.model, MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.0),
                    placement="ffn")
    randomize(handle)
    trainer = MTLoRATrainer(model=model, args=args(tmp_path), train_dataset=dataset())
    assert trainer.mtlora_handle is handle
    batch = {k: torch.tensor([r[k] for r in dataset(2, seed=5)])
             for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    want = model(**batch).loss + auxiliary_loss(model, mask=batch["attention_mask"])
    assert rel_err(trainer.compute_loss(model, dict(batch)), want) <= 1e-6
    attach(model, MTLoRAConfig(r=4, num_experts=3), target_modules="lm_head")  # a second one
    with pytest.raises(ValueError, match=r"attached 2 times, to the model itself, model; "):
        MTLoRATrainer(model=model, args=args(tmp_path), train_dataset=dataset())


def test_a_model_without_adapters_is_refused(tmp_path):
    model, _ = tiny_adapted()
    with pytest.raises(ValueError, match="no mtLoRA adapters.*attach"):
        MTLoRATrainer(model=model, args=args(tmp_path), train_dataset=dataset())


def test_resuming_from_a_checkpoint_continues_the_run_exactly(tmp_path):
    """The Trainer's checkpoints (the whole model: the adapters' tensors beside the base's) hold
    the adapters and the regularizer's step and cached weighting, and resuming from one, in a
    model built and attached afresh, gives the per-step losses and the parameters of the run
    that never stopped (adapter dropout on: the masks' seeds come from the RNG state the Trainer
    restores). (Without the regularizer's state the resumed run refreshed the weighting at
    step 2 of its refresh_every=4 window: 3e-4 off.) Resumed from a checkpoint named, and from
    output_dir's last (``resume_from_checkpoint=True``)."""

    def run(steps: int, out: str, **kw) -> tuple[list[torch.Tensor], list[float]]:
        model = tiny_model("llama")
        handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.2),
                        placement="ffn")
        randomize(handle)
        resume = kw.pop("resume", None)
        trainer = MTLoRATrainer(
            model=model, train_dataset=dataset(16), spectral_weight=50.0, balance_weight=0.1,
            regularizer=SpectralRegularizer(refresh_every=4),
            args=args(tmp_path / out, max_steps=steps, per_device_train_batch_size=2,
                      learning_rate=0.05, optim="adamw_torch", **kw))
        trainer.train(resume_from_checkpoint=resume)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        return [p.detach().clone() for p in handle.parameters()], losses

    straight, straight_losses = run(4, "straight")
    stopped, _ = run(2, "stopped", save_strategy="steps", save_steps=2)
    resumed, resumed_losses = run(4, "resumed", resume=str(tmp_path / "stopped" / "checkpoint-2"))
    # True: the last checkpoint in output_dir, found by the Trainer's rule
    last, _ = run(4, "stopped", resume=True)
    assert len(resumed_losses) == 4 and max(
        abs(a - b) for a, b in zip(straight_losses, resumed_losses)) <= 1e-6
    for a, b, c, s in zip(straight, resumed, last, stopped):
        assert not torch.equal(a, s)  # steps 3 and 4 moved them
        assert rel_err(b, a) <= 1e-6 and rel_err(c, a) <= 1e-6


OTHER_ADAPTERS = {  # a checkpoint of FFN adapters (r 4, N 3, g 2, alpha 64) resumed into ...
    "placement": (dict(placement="attn"), {}, "placement: file has 'ffn'"),
    "layers": (dict(placement="ffn", layers=[1]), {}, r"layers: file has None"),
    "alpha": (dict(placement="ffn"), dict(alpha=8), "alpha: file has 64.0"),
    "targets": (dict(target_modules="q_proj,v_proj"), {}, "placement: file has 'ffn'")}


@pytest.mark.parametrize("case", OTHER_ADAPTERS)
def test_resuming_a_checkpoint_of_other_adapters_is_refused(tmp_path, case):
    """The Trainer loads a checkpoint's state dict non-strictly: adapters in another place (the
    attention's, of the FFN's shapes) or layers trained on from their fresh values with a
    warning in the log, another alpha went unseen, and component adapters on q_proj and v_proj
    took the FFN adapters' optimizer state (a crash in fused Adam: other shapes). Resuming now
    fails before anything is loaded, naming the difference; the model keeps its values. (Of
    component adapters, the adapted modules themselves are compared too.)"""
    from mtlora_kernels.io import AdapterLoadError

    model, _ = tiny_adapted(dict(placement="ffn"))
    MTLoRATrainer(model=model, train_dataset=dataset(),
                  args=args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)).train()
    placement, config, why = OTHER_ADAPTERS[case]
    other = tiny_model("llama")
    handle = attach(other, MTLoRAConfig(r=4, num_experts=3, groups=2, **config), **placement)
    randomize(handle)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    trainer = MTLoRATrainer(model=other, args=args(tmp_path / "out", max_steps=2),
                            train_dataset=dataset())
    with pytest.raises(AdapterLoadError, match=why):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert trainer.state.global_step == 0


def test_resuming_component_adapters_compares_the_adapted_modules(tmp_path):
    """Component-level adapters on q_proj and v_proj: resumed into the same adapters named in
    another order, the run goes on; into adapters on q_proj and k_proj (the same config and
    placement, and here k_proj's width is v_proj's) it is refused, naming the modules."""
    from mtlora_kernels.io import AdapterLoadError

    model, _ = tiny_adapted(dict(target_modules="q_proj,v_proj"))
    MTLoRATrainer(model=model, train_dataset=dataset(),
                  args=args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)).train()
    for targets in ("v_proj,q_proj", "q_proj,k_proj"):
        other, handle = tiny_adapted(dict(target_modules=targets))
        randomize(handle, seed=5)  # values other than the checkpoint's
        trainer = MTLoRATrainer(model=other, args=args(tmp_path / "out", max_steps=1),
                                train_dataset=dataset())
        resume = lambda: trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
        if targets == "q_proj,k_proj":
            with pytest.raises(AdapterLoadError, match=r"adapters 2 only in the file, e\.g\. "
                               r"\['model\.layers\.0\.self_attn\.v_proj\.adapter'.*; 2 only in "
                               r"the model, e\.g\. \['model\.layers\.0\.self_attn\.k_proj"):
                resume()
        else:
            resume()  # at the checkpoint's step already: loads, trains no step
            want = model.state_dict()
            assert all(torch.equal(v, want[k]) for k, v in other.state_dict().items())


def test_a_second_train_starts_the_regularizer_afresh(tmp_path):
    """train() again, resuming nothing: the Trainer's step starts at 0 and so does the
    regularizer, whose weighting (refresh_every=100) is then the one of the adapters at the
    second run's start. It kept the first run's state: the weighting refreshed at that run's
    step 0 (1e-2 off), the one a run that never stopped would still use."""
    model, handle = tiny_adapted(dict(placement="ffn"))
    reg = SpectralRegularizer(refresh_every=100)
    trainer = MTLoRATrainer(model=model, train_dataset=dataset(2), regularizer=reg,
                            spectral_weight=5.0,
                            args=args(tmp_path, max_steps=1, per_device_train_batch_size=2,
                                      learning_rate=0.05))
    trainer.train()
    first = reg.__getstate__()["_weighting"]
    start = [a.lora_B.detach().clone() for a in handle.adapters.values()]
    trainer.train()
    assert (reg.step, reg._refreshed_at) == (1, 0)
    cached = reg.__getstate__()["_weighting"]
    assert len(cached) == len(start) == 2
    for w, b, old in zip(cached, start, first):
        want = spectral_weighting(b)
        assert rel_err(w, want) <= 1e-6 and rel_err(old, want) > 1e-3


def test_the_regularizer_state_is_saved_where_the_trainers_own_save_wrote_nothing(tmp_path):
    """Under FSDP with a sharded state dict the Trainer's save_model writes nothing (the model's
    shards come later, with the optimizer's, which make the checkpoint's folder): the
    regularizer's run state (and the adapters' description) is written all the same, to a
    folder made for it (FileNotFoundError before, at every checkpoint of such a run). The
    Trainer's own FSDP branch is taken, given that plugin's setting."""
    model, _ = tiny_adapted(dict(placement="ffn"))
    reg = SpectralRegularizer(refresh_every=4)
    trainer = MTLoRATrainer(model=model, train_dataset=dataset(4), regularizer=reg,
                            args=args(tmp_path, max_steps=2, per_device_train_batch_size=2))
    trainer.train()
    trainer.is_fsdp_enabled = True
    trainer.accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
        state_dict_type="StateDictType.SHARDED_STATE_DICT")))
    folder = tmp_path / "checkpoint-2"
    trainer.save_model(str(folder))
    assert sorted(os.listdir(folder)) == [ADAPTERS_NAME, REGULARIZER_NAME]
    saved = torch.load(folder / REGULARIZER_NAME, weights_only=True)
    assert (saved["step"], saved["_refreshed_at"]) == (2, 0)
    cached = reg.__getstate__()["_weighting"]
    assert len(cached) == 2 and all(torch.equal(a, b) for a, b in zip(saved["_weighting"], cached))

# Encoder-decoders: T5 (one block class), BART (two layer classes, its stacks under model.), with
# their dropouts off (training mode: one loss, forward after forward).
NO_DROPOUT = {"t5": dict(dropout_rate=0.0), "bart": dict(dropout=0.0)}


def in_decoder(name: str) -> bool:
    """Whether the adapter ``name`` is in the decoder's stack (T5's ``decoder.block...``,
    BART's ``model.decoder.layers...``)."""
    return "decoder" in name.split(".")


@pytest.mark.parametrize("family", NO_DROPOUT)
def test_an_encoder_decoder_trains_each_stack_on_its_own_tokens(tmp_path, family):
    """T5 and BART with adapters in both stacks: the encoder's balance terms count the batch's
    attention_mask, the decoder's the labels' positions (labels != -100; the decoder runs on
    the labels shifted, another length), and training runs. (The source mask given to every
    adapter, as before, failed on the decoder's token shape.)"""
    from mtlora_kernels.losses import balance_loss

    model, handle = tiny_adapted(dict(placement="both"), family, **NO_DROPOUT[family])
    g = torch.Generator().manual_seed(4)
    rows = [{"input_ids": torch.randint(0, 64, (7,), generator=g).tolist(),
             "attention_mask": [1] * (7 - i), "labels": torch.randint(0, 64, (5,), generator=g)
             .tolist()[:5 - 2 * i] + [-100] * (2 * i)} for i in range(2)]
    for row in rows:
        row["input_ids"] = row["input_ids"][:len(row["attention_mask"])]
        row["input_ids"] += [0] * (7 - len(row["input_ids"]))
        row["attention_mask"] += [0] * (7 - len(row["attention_mask"]))
    batch = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    trainer = MTLoRATrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=rows,
                            balance_weight=1.0, spectral_weight=0.0)
    model.train()
    ours = trainer.compute_loss(model, dict(batch))
    task = model(**batch).loss
    source, target = batch["attention_mask"], batch["labels"] != -100
    terms = [a.balance_loss(target if in_decoder(name) else source)
             for name, a in handle.adapters.items()]
    assert {in_decoder(n) for n in handle.adapters} == {True, False}
    assert rel_err(ours, task + torch.stack(terms).mean()) <= 1e-6
    assert rel_err(balance_loss(model, source, target), torch.stack(terms).mean()) <= 1e-6
    every = [a.balance_loss(None if in_decoder(name) else source)
             for name, a in handle.adapters.items()]  # no decoder_mask: every target token
    assert rel_err(balance_loss(model, source), torch.stack(every).mean()) <= 1e-6
    assert rel_err(torch.stack(every).mean(), torch.stack(terms).mean()) > 1e-3
    # A batch's decoder_attention_mask goes to the decoder's adapters instead of the labels'.
    given = {**batch, "decoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1] * 5])}
    ours = trainer.compute_loss(model, dict(given))
    task = model(**given).loss
    terms = [a.balance_loss(given["decoder_attention_mask"] if in_decoder(name) else source)
             for name, a in handle.adapters.items()]
    by_labels = [a.balance_loss(target if in_decoder(name) else source)
                 for name, a in handle.adapters.items()]
    assert rel_err(ours, task + torch.stack(terms).mean()) <= 1e-6
    assert rel_err(torch.stack(by_labels).mean(), torch.stack(terms).mean()) > 1e-3
    trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("family", NO_DROPOUT)
def test_the_seq2seq_trainer_adds_the_term_and_evaluates_by_generation(tmp_path, family):
    """MTLoRASeq2SeqTrainer on T5 and BART (adapters in both stacks): the training loss is the
    task loss plus the auxiliary term, a training step runs and logs it, and evaluation with
    predict_with_generate generates through the adapters (their predictions are not the base
    model's)."""
    from mtlora_kernels.integrations.trainer import MTLoRASeq2SeqTrainer

    model, handle = tiny_adapted(dict(placement="both"), family, **NO_DROPOUT[family])
    g = torch.Generator().manual_seed(6)
    rows = [{"input_ids": torch.randint(2, 64, (7,), generator=g).tolist(),
             "attention_mask": [1] * 7,
             "labels": torch.randint(2, 64, (5,), generator=g).tolist()} for _ in range(4)]
    settings = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                    logging_steps=1, disable_tqdm=True, seed=0, max_steps=1, optim="sgd",
                    learning_rate=0.1, per_device_train_batch_size=2,
                    per_device_eval_batch_size=2, predict_with_generate=True,
                    generation_max_length=6, generation_num_beams=1)
    trainer = MTLoRASeq2SeqTrainer(
        model=model, args=transformers.Seq2SeqTrainingArguments(**settings),
        train_dataset=rows, eval_dataset=rows, balance_weight=0.5, spectral_weight=0.5)
    batch = {k: torch.tensor([r[k] for r in rows[:2]]) for k in rows[0]}
    model.train()
    want = model(**batch).loss + auxiliary_loss(
        model, balance_weight=0.5, spectral_weight=0.5, mask=batch["attention_mask"],
        decoder_mask=batch["labels"] != -100)
    assert rel_err(trainer.compute_loss(model, dict(batch)), want) <= 1e-6
    trainer.train()
    assert any("aux_loss" in entry for entry in trainer.state.log_history)
    ours = trainer.predict(rows).predictions
    with handle.disabled():
        base = trainer.predict(rows).predictions
    assert ours.shape[0] == len(rows) and not np.array_equal(ours, base)
