"""Trainer configuration, task data and the gradmix-train command line (no DeepSpeed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gradmix.trainer.config import SketchingConfig, TrainConfig, load_config
from gradmix.trainer.data import CharTokenizer, TaskPool, read_jsonl, tokenize
from gradmix.trainer.errors import ConfigError, DataError
from gradmix.trainer.main import parse_args
from gradmix.vocabulary import DEFAULT_POLICY

GOOD = """
job = "arith"
output_dir = "out"
server = "127.0.0.1:1234"
store = "store"
[model]
config = { model_type = "gpt2", n_embd = 32, n_layer = 2, n_head = 2 }
[data]
target = "data/target.jsonl"
tasks = { add = "data/add.jsonl" }
[deepspeed]
zero_optimization = { stage = 2 }
[training]
steps = 20
lr = 1
[sketching]
dim = 64
parameters = ["transformer.h.*"]
reanchor_every = 10
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_load_config_resolves_paths_against_the_file_and_validates(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD), env={})
    assert isinstance(config, TrainConfig)
    assert config.data.target == str(tmp_path / "data/target.jsonl")
    assert config.data.tasks == {"add": str(tmp_path / "data/add.jsonl")}
    assert config.store == str(tmp_path / "store") and config.output_dir == str(tmp_path / "out")
    assert config.training.lr == 1.0  # an int where a float is expected is accepted
    assert config.sketching.parameters == ("transformer.h.*",)
    assert config.sketching.projector == "structured"  # default
    assert config.sketching.value_kind == "geometric_log_odds"  # default
    assert config.deepspeed == {"zero_optimization": {"stage": 2}}


def test_environment_then_flags_override_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    env = {"GRADMIX_SERVER": "10.0.0.1:9", "GRADMIX_STORE": "s3://bucket/root"}
    config = load_config(path, env=env)
    assert (config.server, config.store) == ("10.0.0.1:9", "s3://bucket/root")
    assert load_config(path, env=env, server="h:1").server == "h:1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[training]", "[training]\nstepz = 3"), "unknown key \\[training\\].stepz"),
        (("steps = 20", 'steps = "20"'), "\\[training\\].steps must be int"),
        (("stage = 2", "stage = 4"), "ZeRO stage 4 unsupported"),
        (('job = "arith"', 'job = "../x"'), "bad job name"),
        (("dim = 64", "dim = 0"), "dim must be > 0"),
        (('model_type = "gpt2", ', ""), "model_type"),
        (('target = "data/target.jsonl"', ""), "target"),
        (("[sketching]", "[sketching]\nprojector = 'sparse'"), "projector"),
        (("[sketching]", "[sketching]\nvalue_kind = 'mean_probability'"), "value_kind"),
        (("lr = 1", "lr = 1\nlr = 2"), "invalid TOML"),
    ],
)
def test_bad_configs_are_config_errors_naming_the_key(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, GOOD.replace(*change, 1)), env={})


def test_zero_stage_3_takes_the_structured_projector_without_drift_bound(
    tmp_path: Path,
) -> None:
    stage3 = GOOD.replace("stage = 2", "stage = 3")
    config = load_config(_write(tmp_path, stage3), env={})
    assert config.deepspeed["zero_optimization"]["stage"] == 3
    dense = stage3.replace("[sketching]", "[sketching]\nprojector = 'dense'")
    with pytest.raises(ConfigError, match=r"ZeRO stage 3 needs .*structured"):
        load_config(_write(tmp_path, dense), env={})
    drift = stage3.replace("[sketching]", "[sketching]\ndrift_bound = 0.1")
    with pytest.raises(ConfigError, match="drift_bound needs every parameter"):
        load_config(_write(tmp_path, drift), env={})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml", env={})


def test_command_line_surface() -> None:
    args = parse_args(
        ["--config", "j.toml", "--server", "h:1", "--store", "s", "--output-dir", "o"]
    )
    assert (args.config, args.server, args.store, args.output_dir) == ("j.toml", "h:1", "s", "o")
    with pytest.raises(SystemExit):
        parse_args([])


def test_gradmix_train_exits_2_on_a_bad_config(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace("dim = 64", "dim = -1"))
    proc = subprocess.run(
        [sys.executable, "-m", "gradmix.trainer.main", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "dim must be > 0" in proc.stderr


def test_sketching_config_documents_the_reanchor_rule() -> None:
    assert "drift" in (SketchingConfig.__doc__ or "")
    with pytest.raises(ConfigError):
        SketchingConfig(drift_bound=-1.0)


def test_tokenize_scores_only_the_completion_and_eos() -> None:
    tok = CharTokenizer("0123456789+=")
    ex = tokenize("1+2=", "3", tok, max_length=16)
    assert len(ex.input_ids) == 6 and ex.input_ids[-1] == tok.eos_id
    assert ex.loss_mask == (False, False, False, False, True, True)
    with pytest.raises(DataError, match="no scored completion"):
        tokenize("1+2=", "3", tok, max_length=4)  # the cut removes the completion


def test_read_jsonl_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "1", "completion": "2"}) + '\n{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: bad example"):
        read_jsonl(path, CharTokenizer(), 32)


def test_task_pool_loads_lazily_and_draws_reproducibly(tmp_path: Path) -> None:
    rows = [json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) for i in range(20)]
    (tmp_path / "a.jsonl").write_text("\n".join(rows))
    found: list[str] = []

    def resolve(task: str) -> Path | None:
        found.append(task)
        return tmp_path / f"{task}.jsonl" if task == "a" else None

    pool = TaskPool(CharTokenizer(), max_length=16, seed=3, paths={None: tmp_path / "a.jsonl"},
                    resolve=resolve)
    assert found == []  # nothing read before it is needed
    draw = pool.sketch_draw("a", "anchor-1", 8)
    assert found == ["a"] and len(set(draw)) == 8 and draw == pool.sketch_draw("a", "anchor-1", 8)
    assert draw != pool.sketch_draw("a", "anchor-2", 8)
    # The target's rows are the same at every anchor (its loss is compared across them).
    assert pool.sketch_draw(None, "anchor-1", 8) == pool.sketch_draw(None, "anchor-2", 8)
    assert pool.sketch_draw("a", "anchor-1", 100) == list(range(20))
    batch = pool.train_batch("a", step=4, rank=1, batch_size=5)
    assert torch.equal(batch.input_ids, pool.train_batch("a", 4, 1, 5).input_ids)
    assert not torch.equal(batch.input_ids, pool.train_batch("a", 4, 0, 5).input_ids)
    with pytest.raises(DataError, match="no data file"):
        pool.examples("b")


def test_the_shipped_example_job_loads() -> None:
    import gradmix.trainer

    path = Path(gradmix.trainer.__file__).parent / "example_job.toml"
    config = load_config(path, env={})
    assert config.job == "arith" and config.sketching.reanchor_every == 100
    assert config.model.config["model_type"] == "gpt2"
    assert config.policy == {"policy": DEFAULT_POLICY}  # the shipped job uses the default


@pytest.mark.parametrize("relative", ["trainer/example_job.toml", "examples/arith/job.toml"])
def test_the_shipped_jobs_name_files_that_exist_and_parse(relative: str) -> None:
    from gradmix.trainer.data import read_jsonl
    from gradmix.trainer.setup import build_tokenizer

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / relative, env={})
    assert config.store == "", "the server's store, as the server reports it"
    tokenizer = build_tokenizer(config.tokenizer)
    for path in [config.data.target, *config.data.tasks.values()]:
        assert read_jsonl(Path(path), tokenizer, config.data.max_length)
    assert Path(config.data.task_dir).is_dir()


def test_on_server_error_and_the_policy_are_checked_at_load(tmp_path: Path) -> None:
    path = tmp_path / "j.toml"
    base = 'job = "j"\noutput_dir = "o"\n[model]\nconfig = { model_type = "gpt2" }\n'
    base += '[data]\ntarget = "t.jsonl"\n'
    path.write_text('on_server_error = "ignore"\n' + base)
    with pytest.raises(ConfigError, match="on_server_error"):
        load_config(path, env={})
    path.write_text(base + '[policy]\npolicy = "ensembel"\n')
    with pytest.raises(ConfigError, match=r"\[policy\]: .*invalid policy: .ensembel."):
        load_config(path, env={})
    path.write_text(base + "[policy]\nsmoothing = 1.5\n")
    with pytest.raises(ConfigError, match="smoothing"):
        load_config(path, env={})
    path.write_text('on_server_error = "continue"\n' + base)
    assert load_config(path, env={}).on_server_error == "continue"


def test_the_deepspeed_launchers_local_rank_flag_is_accepted() -> None:
    args = parse_args(["--config", "j.toml", "--local_rank=3"])
    assert args.local_rank == 3
    assert parse_args(["--config", "j.toml"]).local_rank is None


def test_cpu_threads_are_capped_per_local_rank_unless_set() -> None:
    import os

    import torch
    from gradmix.trainer.distributed import Dist, cap_cpu_threads

    cpu = Dist(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        assert cap_cpu_threads(cpu, {"LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)
        assert torch.get_num_threads() == max(1, cores // 2)
        assert cap_cpu_threads(cpu, {"LOCAL_WORLD_SIZE": str(4 * cores)}) == 1
        assert cap_cpu_threads(cpu, {"OMP_NUM_THREADS": "7"}) is None
        gpu = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
        assert cap_cpu_threads(gpu, {}) is None
    finally:
        torch.set_num_threads(before)


def test_unknown_characters_and_truncation_are_counted_and_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    tokenizer = CharTokenizer("0123456789+=")
    rows = [("12+3=", "15"), ("s6604=", "1"), ("r6604=", "1"), ("1+1=", "2" * 20)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    with caplog.at_level(logging.WARNING, logger="gradmix.trainer"):
        examples = read_jsonl(path, tokenizer, 12)
    assert len(examples) == 4
    assert examples[1].input_ids == examples[2].input_ids  # why the warning matters
    assert "2 of 4 examples have characters outside the tokenizer's alphabet rs" in caplog.text
    assert "1 of 4 examples are longer than max_length 12 tokens and are cut" in caplog.text
    with pytest.raises(DataError, match="1 of 4 examples are longer than max_length"):
        read_jsonl(path, tokenizer, 12, max_truncated=0.2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gradmix.trainer"):
        read_jsonl(path, tokenizer, 12, warn=False)
    assert not caplog.text
