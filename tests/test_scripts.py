"""The scripts the README points users to (python/examples, python/experiments) run end to end
at tiny sizes, write what they say, and refuse bad arguments before any training. They are not
part of the package, so nothing else runs them."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_module

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _load(script: str):
    return load_module(ROOT / script)


def test_train_multitask_evaluates_on_fixed_examples_apart_from_training():
    """Accuracy before and after training is measured on the same examples (EVAL_SEED's), and
    evaluating does not shift the training batches."""
    pytest.importorskip("transformers")
    ex = _load("python/examples/train_multitask.py")
    data, twin = ex.TaskMixture(), ex.TaskMixture()
    model = ex.build_model(data.vocab_size)

    @torch.no_grad()
    def reference():
        gen, scores = torch.Generator().manual_seed(ex.EVAL_SEED), {}
        for t, name in enumerate(data.names):
            ids, labels, _ = data.batch(16, task=t, gen=gen)
            pred, mask = model(ids).logits[:, :-1].argmax(-1), labels[:, 1:] != -100
            scores[name] = (pred[mask] == labels[:, 1:][mask]).float().mean().item()
        return scores

    for _ in range(2):  # before and after "training" (a random change of every weight)
        assert ex.evaluate(model, data, per_task=16) == reference()
        for p in model.parameters():
            p.data.add_(torch.randn_like(p), alpha=0.5)
    for a, b in zip(data.batch(4), twin.batch(4)):
        assert torch.equal(a, b)  # the training stream as if no evaluation had run


def test_train_multitask_trains_saves_and_reloads_exactly(tmp_path):
    proc = _run("python/examples/train_multitask.py", "--steps", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reloaded adapters reproduce the outputs exactly: True" in proc.stdout
    assert {p.suffix for p in tmp_path.iterdir()} == {".safetensors", ".json"}


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps"),
    (["--batch", "-1"], "--batch"),
    (["--threads", "0"], "--threads"),
])
def test_train_multitask_refuses_bad_arguments(args, message):
    proc = _run("python/examples/train_multitask.py", *args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("text", ["0", "-1e-3", "nan", "inf", "x"])
def test_train_multitask_positive_refuses(text):
    parse = _load("python/examples/train_multitask.py").positive(float)
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)
    assert parse("5e-3") == 5e-3


def test_train_multitask_checks_out_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _run("python/examples/train_multitask.py", "--out", str(tmp_path / "file"),
                timeout=120)
    assert proc.returncode == 2 and "--out" in proc.stderr, proc.stderr[-2000:]
    assert "accuracy after" not in proc.stdout  # refused before training, not after


@pytest.mark.parametrize("script,args", [
    ("task_scaling.py", ["--tasks", "2", "--steps", "2", "--seeds", "1"]),
    ("routing_groups.py", ["--tasks", "2", "--groups", "2", "--controls", "5", "--steps", "2",
                           "--seeds", "1"]),
    ("gradient_conflict.py", ["--tasks", "2", "--checkpoints", "1", "2", "--seeds", "1"]),
])
def test_experiment_runs_and_writes_its_results_where_asked(tmp_path, script, args):
    proc = _run(f"python/experiments/{script}", *args, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = script.removesuffix(".py")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.md", f"{name}.png"]
    text = (tmp_path / f"{name}.md").read_text()
    assert "## Provenance" in text and "git commit" in text
    # The CPU by name: the same code and seeds train differently on another CPU.
    machine = re.search(r"^- machine: (.*), (\d+) CPUs, ", text, flags=re.M)
    assert machine and int(machine[2]) == os.cpu_count(), text
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.*)$", cpuinfo.read_text(), flags=re.M)
        assert machine[1] == names[0].strip()


@pytest.mark.parametrize("script,args,message", [
    ("task_scaling.py", ["--steps", "-5"], "--steps"),
    ("gradient_conflict.py", ["--checkpoints", "20", "5"], "--checkpoints"),
    ("gradient_conflict.py", ["--tasks", "1"], "--tasks"),
    ("routing_groups.py", ["--groups", "3"], "--groups"),
])
def test_experiment_refuses_bad_arguments(tmp_path, script, args, message):
    proc = _run(f"python/experiments/{script}", *args, "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_gradient_conflict_says_less_or_more_conflict():
    change = _load("python/experiments/gradient_conflict.py").conflict_change
    assert change(-0.013, -0.054) == "76% less"  # the paper's
    assert change(-0.0563, -0.0174) == "224% more"  # block-level conflicts more: not "-224% less"
    assert change(0.0, -0.02) == "100% less"
    assert change(-0.0031, 0.0043) == "n/a (block -0.0031, component +0.0043)"
    assert change(0.0061, -0.0052) == "n/a (block +0.0061, component -0.0052)"


def _readme_snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_snippets_run_and_do_what_their_comments_say(tmp_path, monkeypatch):
    """The README's first two Python blocks, run as written: the API block (its ``mix`` call is the
    adapter's op, in eval mode), then the training block on a tiny LLaMA (its ``model`` and
    ``batch``; its optimizer step moves every B off zero, so the adapters change the outputs),
    which must leave the model as it was."""
    pytest.importorskip("transformers")
    from test_hf import tiny_model

    api, training, _ = _readme_snippets()
    monkeypatch.delenv("MTLORA_BACKEND", raising=False)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(api, "README.md (API)", "exec"), ns)
    assert ns["out"].shape == ns["z"].shape == ns["y"].shape and ns["aux"].ndim == 0
    assert ns["layer"](ns["z"]).shape == ns["z"].shape
    # Its first mix call, run again with random experts on a few tokens, is the adapter in eval.
    op = api[api.index("y = mix(z, adapter.lora_A"):api.index("\ntask_logits")]
    ns["adapter"].eval()
    ns["z"] = ns["z"][:1, :4]
    with torch.no_grad():
        ns["adapter"].lora_B.normal_()
        exec(compile(op, "README.md (API, mix)", "exec"), ns)
        torch.testing.assert_close(ns["adapter"](ns["z"]), ns["y"])

    model = tiny_model("llama")
    ids = torch.randint(0, 64, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        before = model(**batch).logits
    keys = list(model.state_dict())
    monkeypatch.chdir(tmp_path)
    step = "\nloss.backward(); optimizer.step()\n"
    assert step in training
    training = training.replace(step, step + "assert all(a.lora_B.abs().max() > 0 for a in "
                                "handle.adapters.values())\n"
                                "assert not torch.equal(model(**batch).logits, before)\n")
    ns = {"model": model, "batch": batch, "before": before}
    exec(compile(training, "README.md (training)", "exec"), ns)
    assert torch.isfinite(ns["loss"]) and ns["loss"].requires_grad
    assert torch.equal(ns["ref"], before)  # disabled: the base model's logits
    assert {p.suffix for p in (tmp_path / "ckpt").iterdir()} == {".safetensors", ".json"}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)  # removed: the original model
    assert list(model.state_dict()) == keys


def test_readme_trainer_snippet_trains_and_saves_the_adapters(tmp_path, monkeypatch):
    """The README's transformers.Trainer block, run as written on a tiny LLaMA: the adapters
    train (B moves off zero) and are saved alone."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from test_hf import tiny_model

    *_, trainer_block = _readme_snippets()
    model = tiny_model("llama")
    rows = [torch.randint(0, 64, (9,)).tolist() for _ in range(4)]
    ns = {"model": model,
          "train_dataset": [{"input_ids": r, "labels": r} for r in rows],
          "args": transformers.TrainingArguments(
              output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
              report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
              logging_steps=1)}
    monkeypatch.chdir(tmp_path)
    exec(compile(trainer_block, "README.md (Trainer)", "exec"), ns)
    assert all(a.lora_B.abs().max() > 0 for a in ns["handle"].adapters.values())
    assert {p.suffix for p in (tmp_path / "adapters").iterdir()} == {".safetensors", ".json"}
    assert any("aux_loss" in entry for entry in ns["trainer"].state.log_history)
