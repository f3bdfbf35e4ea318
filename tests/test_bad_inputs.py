"""Bad input ends as one line `error: ...` naming the value and the fix, exit code 2, no
traceback, before any process group starts; any other failure ends as one line plus the path of
a log holding the traceback, exit code 1.

Most classes are checked in-process against `cli.run` (fast); a handful run `train.py` as a
subprocess to prove the whole path: one stderr line, exit code, no traceback, no process group.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from lightning_attn_parallel import preflight
from lightning_attn_parallel.config import CONF_DIR, register_configs
from lightning_attn_parallel.errors import UserError, run_or_exit
from lightning_attn_parallel.models import ModelConfig
from lightning_attn_parallel.plan import ParallelPlan, PlanError

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false"]
TINY = dict(family="llama", vocab_size=256, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2,
            ffn_dim=512, max_seq_len=1024)  # conf/model/tiny.yaml


def train(args: list[str], tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args, *QUICK, f"run_dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_line_user_error(result: subprocess.CompletedProcess, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    # The strategy logs this when it starts the process group: the error came before it.
    assert "Initializing distributed" not in result.stderr + result.stdout
    assert "Seed set" not in result.stderr + result.stdout  # cli.run seeds once the checks pass
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Token files and checkpoints, each broken in one way."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 256, size=4096)
    out = {"good": d / "good.bin", "short": d / "short.bin", "odd": d / "odd.bin",
           "wide": d / "wide.bin", "big_ids": d / "big_ids.bin", "meta_dir": d / "meta"}
    ids.astype(np.uint16).tofile(out["good"])
    ids[:100].astype(np.uint16).tofile(out["short"])
    out["odd"].write_bytes(ids.astype(np.uint16).tobytes() + b"x")
    ids.astype(np.uint32).tofile(out["wide"])
    np.concatenate([ids, [300]]).astype(np.uint16).tofile(out["big_ids"])
    out["edge_id"] = d / "edge_id.bin"  # one id equal to the vocabulary size: the first one out
    np.concatenate([ids, [256]]).astype(np.uint16).tofile(out["edge_id"])
    out["meta_dir"].mkdir()
    ids.astype(np.uint32).tofile(out["meta_dir"] / "train.bin")
    (out["meta_dir"] / "metadata.json").write_text('{"dtype": "uint32", "vocab_size": 50000}')
    out["meta"] = out["meta_dir"] / "train.bin"
    # checkpoints: a complete one of this model, one of another model, a truncated one
    state = {"state_dict": {"model.w": torch.zeros(256, 64)}, "hyper_parameters": {"model": TINY}}
    out["ckpt"] = d / "ok.ckpt"
    torch.save(state, out["ckpt"])
    out["other"] = d / "other.ckpt"
    torch.save({**state, "hyper_parameters": {"model": {**TINY, "n_layers": 8}}}, out["other"])
    out["truncated"] = d / "truncated.ckpt"
    out["truncated"].write_bytes(out["ckpt"].read_bytes()[:-5000])
    # a sharded (DCP) checkpoint folder with one shard removed
    import torch.distributed.checkpoint as dcp

    out["dcp"] = d / "dcp"
    dcp.save({"model": {"w": torch.ones(64, 64)}}, checkpoint_id=str(out["dcp"]))
    for shard in out["dcp"].glob("*.distcp"):
        shard.unlink()
    out["dcp_nometa"] = d / "dcp_nometa"
    out["dcp_nometa"].mkdir()
    return out


def compose_config(overrides: list[str], run_dir: Path):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        keys = {o.split("=")[0] for o in overrides}
        quick = [q for q in QUICK if q.split("=")[0] not in keys]
        return compose("config", overrides=[*overrides, *quick, f"run_dir={run_dir}"])


def refused(overrides: list[str], tmp_path: Path) -> str:
    """The pre-flight's message for these overrides (it must refuse them, writing nothing)."""
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as info:
        preflight.check_run(compose_config(overrides, run_dir))
    assert not run_dir.exists(), "nothing may be written before the checks pass"
    message = str(info.value)
    assert "\n" not in message
    return message



CPU3 = ["trainer.accelerator=cpu", "trainer.devices=3"]
CPU2 = ["trainer.accelerator=cpu", "trainer.devices=2"]

# (overrides, words the one line must hold); "{name}" is replaced by files[name]
CASES = {
    # config keys added with + in every group, and at the top level
    "+optim key": (["+optim.betaz=0.9"], ["optim.betaz", "lr"]),
    "+data key": (["+data.shuffle=false"], ["data.shuffle"]),
    "+trainer key": (["+trainer.max_step=3"], ["trainer.max_step"]),
    "+model key": (["+model.n_head=4"], ["model.n_head"]),
    "+plan key": (["+strategy.plan.tensor_parallel=2"], ["strategy.plan.tensor_parallel"]),
    "+key on an empty logger": (["+logger.entity=me"], ["logger.entity", "no _target_"]),
    "+logger key": (["logger=csv", "+logger.flush_every=3"], ["logger.flush_every", "CSVLogger"]),
    "+wandb key passed on to wandb.init": (["logger=wandb", "+logger.entitty=me"], ["logger.entitty", "WandbLogger", "entity"]),
    "+callbacks key": (["callbacks=default", "+callbacks.mfu=true"], ["callbacks.mfu", "peak_tflops"]),
    "+strategy key": (["+strategy.timeout_sec=3"], ["strategy.timeout_sec", "timeout_s"]),
    "strategy target": (["strategy._target_=lightning.NoSuchStrategy"], ["strategy._target_", "cannot be imported"]),
    "plan on a strategy without one": (["strategy=lightning_ddp", *CPU2, "strategy.plan.tp=2"], ["strategy.plan", "DDPStrategy"]),
    "strategy timeout": (["strategy.timeout_s=-1"], ["strategy.timeout_s=-1"]),
    "+top-level key": (["+seeds=3"], ["seeds"]),
    # values
    "lr zero": (["optim.lr=0"], ["optim.lr=0"]),
    "lr negative": (["optim.lr=-1e-3"], ["optim.lr=-0.001"]),
    "negative warm-up": (["optim.warmup_steps=-5"], ["optim.warmup_steps=-5"]),
    "min_lr_ratio above 1": (["optim.min_lr_ratio=2"], ["optim.min_lr_ratio=2"]),
    "negative weight decay": (["optim.weight_decay=-0.1"], ["optim.weight_decay"]),
    "max_steps=-1 without max_epochs": (["trainer.max_steps=-1"], ["trainer.max_steps=-1", "max_epochs"]),
    "max_steps=0": (["trainer.max_steps=0"], ["trainer.max_steps=0"]),
    "seq_len 0": (["data.seq_len=0"], ["data.seq_len=0"]),
    "micro-batch 0": (["data.micro_batch_size=0"], ["data.micro_batch_size=0"]),
    "seq_len above max_seq_len": (["data.seq_len=4096"], ["data.seq_len=4096", "max_seq_len=1024"]),
    "smoke + data path": (["+scale=smoke", "data=tokens", "data.train_path={good}"], ["+scale=smoke", "data.source=tokens"]),
    # Trainer arguments
    "precision": (["trainer.precision=bf17"], ["trainer.precision='bf17'", "bf16-mixed"]),
    "devices=0": (["trainer.devices=0"], ["trainer.devices=0"]),
    "num_nodes=0": (["trainer.num_nodes=0"], ["trainer.num_nodes=0"]),
    "accelerator": (["trainer.accelerator=tpuu"], ["trainer.accelerator='tpuu'", "cpu"]),
    "accumulate 0": (["trainer.accumulate_grad_batches=0"], ["trainer.accumulate_grad_batches=0"]),
    "negative clip": (["trainer.gradient_clip_val=-1"], ["trainer.gradient_clip_val=-1"]),
    "val_check_interval 0": (["trainer.val_check_interval=0"], ["trainer.val_check_interval=0"]),
    # the plan's own fields, against the world, and against the model
    "plan negative cp_min_seq_len": (["strategy.plan.cp_min_seq_len=-1"], ["cp_min_seq_len=-1", ">= 0"]),
    "plan negative bandwidth": (["strategy.plan.inter_node_gbps=-5"], ["inter_node_gbps=-5"]),
    "plan zero bucket": (["strategy.plan.bucket_mb=0"], ["bucket_mb=0"]),
    "plan cp kernel": (["strategy.plan.cp_kernel=zigzag"], ["cp_kernel='zigzag'", "allgather"]),
    "tp vs world": ([*CPU3, "strategy.plan.tp=2"], ["tp=2", "world size 3"]),
    "degrees vs world": ([*CPU2, "strategy.plan.dp_replicate=1", "strategy.plan.dp_shard=1"], ["world size 2"]),
    "tp vs heads": ([*CPU2, "strategy.plan.tp=2", "model.n_heads=3", "model.n_kv_heads=3", "model.d_model=96"],
                    ["tp=2", "n_heads=3"]),
    "tp vs KV heads": ([*CPU3, "strategy.plan.tp=3"], ["tp=3", "n_kv_heads=2"]),
    "cp vs seq_len": ([*CPU2, "strategy.plan.cp=2", "data.seq_len=250"], ["data.seq_len=250", "2 x cp=2", "248"]),
    "ulysses vs heads": ([*CPU2, "strategy.plan.cp=2", "strategy.plan.cp_kernel=ulysses", "model.n_heads=3",
                          "model.n_kv_heads=3", "model.d_model=96"], ["ulysses", "cp=2"]),
    "ep vs experts": (["+recipe=tiny_moe", *CPU3, "strategy.plan.ep=3"], ["ep=3", "n_routed_experts=8", "[1, 2, 4, 8]"]),
    "ep on a dense model": ([*CPU2, "strategy.plan.ep=2"], ["ep=2", "set ep=1"]),
    "fp8 experts on a dense model": (["strategy.plan.fp8_experts=true"], ["fp8_experts=True", "no routed experts"]),
    "pp vs world": ([*CPU3, "strategy.plan.pp=2"], ["pp=2", "world size 3"]),
    "pp vs layers": ([*CPU2, "strategy.plan.pp=2", "strategy.plan.pp_schedule=interleaved_1f1b",
                      "strategy.plan.pp_stages_per_rank=3"], ["6 stages", "n_layers=4"]),
    "pp layout vs layers": ([*CPU2, "strategy.plan.pp=2", "strategy.plan.pp_layers_per_stage=[1,2]"],
                            ["pp_layers_per_stage=[1, 2]", "n_layers=4"]),
    "pp too few micro-batches": ([*CPU2, "strategy.plan.pp=2", "strategy.plan.pp_microbatches=1"],
                                 ["pp_microbatches=1", "at least 2"]),
    "pp zero bubble with compile": ([*CPU2, "strategy.plan.pp=2", "strategy.plan.pp_schedule=zbv", "strategy.plan.compile=block"], ["zbv", "interleaved_1f1b"]),
    "model too big for RAM": (["model.d_model=16384", "model.n_heads=128", "model.n_kv_heads=8",
                               "model.ffn_dim=65536", "model.n_layers=200"], ["GiB", "dp_shard"]),
    # data files
    "data file missing": (["data=tokens", "data.seq_len=256", "data.train_path=/nonexistent/tokens.bin"],
                          ["data.train_path='/nonexistent/tokens.bin'", "does not exist"]),
    "data shorter than a sequence": (["data=tokens", "data.seq_len=256", "data.train_path={short}"], ["100 tokens", "data.seq_len=256"]),
    "size not a multiple of dtype": (["data=tokens", "data.seq_len=256", "data.train_path={odd}"], ["8193 bytes", "data.dtype"]),
    "uint32 read as uint16": (["data=tokens", "data.seq_len=256", "data.train_path={wide}"], ["uint32", "data.dtype=uint32"]),
    "ids above the vocabulary": (["data=tokens", "data.seq_len=256", "data.train_path={big_ids}"], ["token id 300", "model.vocab_size=256"]),
    "an id equal to the vocabulary size": (["data=tokens", "data.seq_len=256", "data.train_path={edge_id}"],
                                           ["token id 256", "at least 257"]),
    "dtype against metadata": (["data=tokens", "data.seq_len=256", "data.train_path={meta}"], ["data.dtype=uint32"]),
    "vocabulary against metadata": (["data=tokens", "data.seq_len=256", "data.dtype=uint32", "data.train_path={meta}"],
                                    ["model.vocab_size=256", "50000"]),
    "val file missing": (["data=tokens", "data.seq_len=256", "data.train_path={good}", "data.val_path=/nope.bin"], ["data.val_path"]),
    "unknown dtype": (["data=tokens", "data.seq_len=256", "data.train_path={good}", "data.dtype=int8"], ["data.dtype='int8'"]),
    # checkpoints
    "checkpoint missing": (["ckpt_path=/nonexistent.ckpt"], ["/nonexistent.ckpt", "does not exist"]),
    "checkpoint truncated": (["ckpt_path={truncated}"], ["truncated"]),
    "checkpoint of another model": (["ckpt_path={other}"], ["another model", "model.n_layers=8 there but 4 here"]),
    "sharded checkpoint missing a shard": (["ckpt_path={dcp}"], ["incomplete", ".distcp", "missing"]),
    "sharded checkpoint without metadata": (["ckpt_path={dcp_nometa}"], [".metadata"]),
    # output folders
    "run_dir read-only": (["run_dir=/proc/lap-run"], ["run_dir='/proc/lap-run'", "not writable"]),
    "run_dir under a file": (["run_dir={good}/run"], ["is a file"]),
    "export_path is a folder": (["export_path={meta_dir}"], ["export_path=", "is a folder"]),
    "export_path read-only": (["export_path=/proc/lap/model.pt"], ["export_path='/proc/lap'", "not writable"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_preflight_refuses_each_bad_input_with_one_line(name, files, tmp_path):
    overrides, words = CASES[name]
    overrides = [o.format(**files) for o in overrides]
    if any(o.startswith("run_dir=") for o in overrides):
        run_dir = next(o for o in overrides if o.startswith("run_dir="))[len("run_dir="):]
        overrides = [o for o in overrides if not o.startswith("run_dir=")]
        with pytest.raises(UserError) as info:
            preflight.check_run(compose_config(overrides, Path(run_dir)))
        message = str(info.value)
    else:
        message = refused(overrides, tmp_path)
    for word in words:
        assert word.format(**files) in message, message


def test_the_good_inputs_pass(files, tmp_path):
    """The same checks accept the unbroken files: each case above fails for its own reason."""
    for extra in (["data=tokens", "data.seq_len=256", f"data.train_path={files['good']}"],
                  ["data=tokens", "data.seq_len=256", "data.dtype=uint32", "model.vocab_size=50000",
                   f"data.train_path={files['meta']}"],
                  [f"ckpt_path={files['ckpt']}"], ["+scale=smoke", "data.source=tokens", f"data.train_path={files['good']}"],
                  ["trainer.max_steps=-1", "trainer.max_epochs=1"]):
        preflight.check_run(compose_config(extra, tmp_path / "run"))


def test_no_room_for_a_checkpoint_is_refused(monkeypatch, tmp_path):
    real = preflight.shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    message = refused([], tmp_path)
    assert "run_dir=" in message and "GiB free" in message and "enable_checkpointing=false" in message


@pytest.mark.parametrize("field, value", [("tp", True), ("dp_shard", "2"), ("sequence_parallel", "true"),
                                          ("cp_min_seq_len", -1), ("intra_node_gbps", -1.0),
                                          ("inter_node_gbps", 0), ("ranks_per_node", 0), ("ac_every_n", 1.5),
                                          ("offload_activations", 1), ("hierarchical", "sometimes"),
                                          ("fused_master_step", "yes")])
def test_parallel_plan_checks_the_type_and_range_of_every_field(field, value):
    with pytest.raises(PlanError) as info:
        ParallelPlan(**{field: value})
    assert f"{field}={value!r}" in str(info.value)


def test_a_field_added_later_is_validated_from_its_declaration():
    from lightning_attn_parallel.plan import _limits

    @dataclasses.dataclass
    class Extended(ParallelPlan):
        prefetch: int = dataclasses.field(default=1, metadata=_limits(minimum=0))
        pin: bool = False

    assert Extended(prefetch=3).prefetch == 3
    for bad in (dict(prefetch=-1), dict(prefetch=True), dict(pin="yes")):
        with pytest.raises(PlanError):
            Extended(**bad)


# ---------------------------------------------------------------- the whole path, as a subprocess
@pytest.mark.parametrize("args, words", [
    (["+recipe=no_such_recipe"], ["no_such_recipe", "tiny", "deepseek_67b"]),
    (["+optim.betaz=0.9"], ["optim.betaz", "lr"]),
    (["trainer.max_steps=[1"], ["trainer.max_steps=[1"]),
    (["trainer.accelerator=cpu", "trainer.devices=3", "strategy.plan.tp=3"], ["tp=3", "n_kv_heads=2"]),
    (["data=tokens", "data.seq_len=256", "data.train_path={big_ids}"], ["token id 300"]),
    (["ckpt_path={truncated}"], ["truncated"]),
])
def test_train_py_reports_bad_input_as_one_line(args, words, files, tmp_path):
    assert_one_line_user_error(train([a.format(**files) for a in args], tmp_path), *words)


def test_train_py_reports_a_failure_during_the_run_with_its_log(tmp_path):
    """A failure that is not bad input (here: the corpus cache cannot be created) -> one line with
    the traceback's path, exit code 1."""
    result = train(["data.cache_dir=/proc/lap-cache", "trainer.max_steps=1"], tmp_path, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-3000:]
    assert lines[-1].startswith("error: ") and "(traceback: " in lines[-1], lines[-1]
    log = Path(lines[-1].rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "run" and "Traceback" in log.read_text()
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- the helper other entry points use
def test_run_or_exit_reports_user_errors_as_one_line_exit_2(capsys):
    def main():
        raise UserError("data.path='x.bin' does not exist: give an existing file")

    with pytest.raises(SystemExit) as info:
        run_or_exit(main)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: data.path='x.bin' does not exist: give an existing file\n"


def test_run_or_exit_logs_the_traceback_of_other_failures(capsys, tmp_path):
    def main():
        raise RuntimeError("collective timed out\nsecond line")

    with pytest.raises(SystemExit) as info:
        run_or_exit(main, log_dir=lambda: tmp_path / "run")
    assert info.value.code == 1
    err = capsys.readouterr().err
    log = tmp_path / "run" / "error-rank0.log"
    assert err == f"error: RuntimeError: collective timed out (traceback: {log})\n"
    assert "Traceback" in log.read_text() and "second line" in log.read_text()


# ---------------------------------------------------------------- an installed (not editable) package
def test_an_installed_package_finds_every_recipe_from_another_folder(tmp_path):
    """`pip install .` (built, not editable) ships conf/ and recipes/: from a folder with no
    source tree, the recipe list and an unknown recipe's error name every recipe."""
    import shutil

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "lightning_attn_parallel", source / "lightning_attn_parallel",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    expected = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    listed = subprocess.run([sys.executable, "-c", "import lightning_attn_parallel.config as c; "
                             "print(c.__file__); print(','.join(c.available_recipes()))"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    where, names = listed.stdout.split()
    assert where.startswith(str(target)), where  # the installed copy, not the source tree
    assert names.split(",") == expected
    result = subprocess.run([sys.executable, "-m", "lightning_attn_parallel.train", "+recipe=nope",
                             f"run_dir={tmp_path / 'run'}"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=120)
    line = assert_one_line_user_error(result, "recipe 'nope'")
    assert all(name in line for name in expected)


def test_the_strategy_checks_the_plan_against_the_model_before_the_process_group():
    """Python-API users get the same check_model, from the strategy's set-up, before
    init_process_group (setup_environment calls it first)."""
    from lightning_attn_parallel import AttnHybridStrategy, CausalLMModule

    strategy = AttnHybridStrategy(plan=ParallelPlan(tp=3), parallel_devices=[torch.device("cpu")] * 3)
    strategy._lightning_module = CausalLMModule(ModelConfig(**TINY))
    with pytest.raises(PlanError, match="n_kv_heads=2"):
        strategy.setup_environment()
    assert not torch.distributed.is_initialized()
    strategy._lightning_module = CausalLMModule(ModelConfig(**{**TINY, "n_kv_heads": 3}))
    from lightning_attn_parallel.parallel.apply import check_plan

    check_plan(strategy._requested_plan, 3, strategy._lightning_module.model_config, torch.device("cpu"))


def test_max_steps_minus_one_schedules_over_lightnings_estimate_and_resumes_add_no_versions(monkeypatch, tmp_path):
    """max_steps=-1 with max_epochs: the module gets no fixed length, so its schedule spans
    trainer.estimated_stepping_batches; the checkpoint callback never writes `-vN` copies."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_attn_parallel.cli import run

    seen = {}

    def fit(trainer, module, datamodule=None, ckpt_path=None):
        seen.update(trainer=trainer, module=module)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    run(compose_config(["trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.enable_checkpointing=true"],
                       tmp_path / "run"))
    assert seen["module"].hparams.total_steps is None
    assert seen["trainer"].max_epochs == 2
    checkpoints = [c for c in seen["trainer"].callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoints and all(not c._enable_version_counter for c in checkpoints)
