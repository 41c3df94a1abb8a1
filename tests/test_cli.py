"""The CLI end to end on a tiny checkpoint: finetune, registry, export, errors, resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapterhub.cli import main
from adapterhub.finetune import FinetuneJob, run_finetune
from adapterhub.train import TrainConfig


def _dataset(path: Path, n: int = 40) -> Path:
    words = ["ab", "cd", "efg", "hi", "jkl", "mn"]
    with path.open("w") as f:
        for i in range(n):
            w = words[i % len(words)] + str(i % 5)
            f.write(json.dumps({"prompt": f"rev {w} =", "completion": f" {w[::-1]}"}) + "\n")
    return path


def _finetune(ckpt, data_dir, train, *extra: str) -> int:
    return main(["finetune", "--name", "rev", "--base", str(ckpt), "--train", str(train),
                 "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2",
                 "--no-progress", "--data-dir", str(data_dir), *extra])


def test_finetune_register_list_show_export(tiny_llama, tmp_path, capsys):
    data = tmp_path / "data"
    train = _dataset(tmp_path / "train.jsonl")
    assert _finetune(tiny_llama, data, train, "--method", "hydra", "--rank", "4",
                     "--alias", "prod") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["version"] == 1 and "exact_match" in result["adapter"]
    assert _finetune(tiny_llama, data, train, "--method", "mos", "--rank", "4",
                     "--param", "pool_vectors_per_layer=2", "--param", "private_rank=1") == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2

    assert main(["adapters", "list", "--json", "--data-dir", str(data)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "rev" and rows[0]["latest_version"] == 2
    assert rows[0]["aliases"] == {"prod": 1}

    assert main(["adapters", "show", "rev@prod", "--data-dir", str(data)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["method"] == "hydra"

    out = tmp_path / "export"
    assert main(["adapters", "export", "rev@prod", "--out", str(out),
                 "--data-dir", str(data)]) == 0
    capsys.readouterr()
    # Stock PEFT loads the export and reproduces our adapter's logits.
    from adapterhub.methods import load_adapter
    from adapterhub.registry import Registry

    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama),
                        Registry(data).resolve("rev@prod"))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(out))
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, ours(input_ids=ids).logits, atol=1e-5,
                                   rtol=0)


def test_run_is_tracked_in_mlflow(tiny_llama, tmp_path):
    from mlflow.tracking import MlflowClient

    from adapterhub.registry import Registry

    registry = Registry(tmp_path / "data")
    job = FinetuneJob(name="tracked", base=str(tiny_llama),
                      train_file=str(_dataset(tmp_path / "t.jsonl")),
                      train=TrainConfig(steps=5, batch_size=4, checkpoint_every=0))
    result = run_finetune(job, tmp_path / "data", registry=registry, progress=False)
    client = MlflowClient(registry.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "lora" and run.data.params["train.steps"] == "5"
    for key in ("trainable_params", "adapter_bytes", "train_tokens_per_s", "eval_loss",
                "exact_match", "base_exact_match", "base_eval_loss"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(result.run_id, "loss")) == 5
    assert run.data.metrics["adapter_bytes"] > 0
    version = registry.resolve_version("tracked")
    assert version.run_id == result.run_id and version.method == "lora"


def test_interrupted_job_resumes_in_the_same_run(tiny_llama, tmp_path, monkeypatch):
    from adapterhub.train import trainer as trainer_mod

    job = FinetuneJob(name="resumable", base=str(tiny_llama), eval_base=False,
                      train_file=str(_dataset(tmp_path / "t.jsonl")),
                      train=TrainConfig(steps=6, batch_size=4, checkpoint_every=2))
    real = trainer_mod.train_step
    calls = {"n": 0}

    def crash_on_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "train_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(job, tmp_path / "data", progress=False)
    monkeypatch.setattr(trainer_mod, "train_step", real)
    state = json.loads((tmp_path / "data" / "jobs" / "resumable" / "job.json").read_text())
    assert state["status"] == "running"
    result = run_finetune(job, tmp_path / "data", progress=False)
    assert result.run_id == state["run_id"] and result.version == 1
    from mlflow.tracking import MlflowClient

    from adapterhub.registry import Registry

    client = MlflowClient(Registry(tmp_path / "data").tracking_uri)
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "dataset not found"),
        ("malformed", "train.jsonl:3: invalid JSON"),
        ("method", "unknown adapter method .dora."),
        ("checkpoint", "cannot be a checkpoint|config.json|not supported|unreadable"),
    ],
)
def test_bad_input_gives_one_error_line(tiny_llama, tmp_path, capsys, setup, message):
    train = _dataset(tmp_path / "train.jsonl")
    base = tiny_llama
    args: list[str] = []
    if setup == "missing":
        train = tmp_path / "nope.jsonl"
    elif setup == "malformed":
        lines = train.read_text().splitlines()
        lines[2] = '{"prompt": "x", '
        train.write_text("\n".join(lines))
    elif setup == "method":
        args = ["--method", "dora"]
    elif setup == "checkpoint":
        base = tmp_path / "broken"
        base.mkdir()
        (base / "config.json").write_text("{not json")
    assert _finetune(base, tmp_path / "data", train, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]


def test_incompatible_adapter_export_fails_cleanly(tiny_llama, tiny_qwen2, tmp_path, capsys):
    data = tmp_path / "data"
    assert _finetune(tiny_llama, data, _dataset(tmp_path / "t.jsonl")) == 0
    capsys.readouterr()
    code = main(["adapters", "export", "rev", "--out", str(tmp_path / "x"), "--base",
                 str(tiny_qwen2), "--data-dir", str(data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "error:" in err[0]
    assert main(["adapters", "show", "ghost", "--data-dir", str(data)]) == 2
    assert "not found" in capsys.readouterr().err


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).parent / "adapterhub"
    proc = subprocess.run([str(exe), "finetune", "--name", "x", "--train",
                           str(tmp_path / "missing.jsonl"), "--data-dir", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: dataset not found")
