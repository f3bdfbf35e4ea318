"""Pipeline parallelism inside Lightning's loop and around its checkpoints: the metric callbacks,
the non-finite step check, resuming (under pp=2, and across pp=1, 2 and 4), validation, and
Hugging Face folders in (each stage reads its own blocks) and out (exported from a pp checkpoint).

One spawn of 2 gloo processes (pp=2, fp64) runs every fit whose reference needs no other world;
one spawn of 4 loads the pp=2 checkpoint under pp=4. References: one process, the same run
uninterrupted, or tp=2 on the same 2 ranks (no pipeline, the same global batch).
"""
from __future__ import annotations

import lightning as L
import pytest
import torch

from dist_utils import assert_close, run_distributed
from lightning_utils import FixedTokens, LossRecorder, loader, params_of, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.callbacks import LoadBalanceCallback, MemoryCallback, ThroughputCallback, default_callbacks
from lightning_attn_parallel.callbacks import metrics as m
from lightning_attn_parallel.callbacks.nonfinite import NonFiniteGuard, NonFiniteStep
from lightning_attn_parallel.checkpoint import export_consolidated
from lightning_attn_parallel.export import export_model
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.models.flops import attention_flops_per_token

TINY = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
ROWS, SEQ = 4, 16  # sequences per batch (the pipeline's one data-parallel rank), tokens per sequence
PP2 = dict(pp=2, pp_microbatches=2)
NO_PP = dict(tp=2)  # the same 2 ranks and global batch, without a pipeline
PER_EPOCH, SAVE_STEP, FINAL_STEP = 2, 2, 4



def make_module(pretrained=None) -> lap.CausalLMModule:
    L.seed_everything(0, verbose=False)
    torch.set_default_dtype(torch.float64)
    cfg = ModelConfig(**TINY)
    module = lap.CausalLMModule(cfg, lr=1e-2, warmup_steps=1, total_steps=FINAL_STEP, pretrained=pretrained)
    if pretrained is None:
        module.configure_model()  # with a folder, the strategy builds it on the meta device
    return module


def fit(plan: dict, world: int, max_steps: int, callbacks=(), ckpt_path=None, save_path=None,
        validate: bool = False, rows: int = ROWS, pretrained=None, export_to=None, **trainer_kwargs) -> dict:
    """The plan's run on data-parallel rank 0's share (every plan here has one data-parallel rank)."""
    module, recorder = make_module(pretrained), LossRecorder(average_over_ranks=True)
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan)), devices=world,
                            max_steps=max_steps, limit_train_batches=PER_EPOCH, callbacks=[recorder, *callbacks],
                            limit_val_batches=2 if validate else 0, **trainer_kwargs)
    val = loader(FixedTokens(seed=1), rows) if validate else None
    trainer.fit(module, loader(FixedTokens(), rows), val, ckpt_path=ckpt_path)
    if save_path is not None:
        trainer.save_checkpoint(save_path)
    if export_to is not None:  # the end-of-run exports of train.py (collective)
        export_model(module.model, f"{export_to}_hf", "hf", "fp32")
        export_consolidated(f"{export_to}.pt", module.model)
    return {"losses": recorder.losses, "params": params_of(module), "start_params": recorder.start_params,
            "val": float(trainer.callback_metrics["val/loss"]) if validate else None}


class Inject(L.Callback):
    """A NaN on one rank at step 2: in a parameter of its stage before the forward ("weight"), or in
    one of its gradients after the backward ("grad")."""

    def __init__(self, where: str, rank: int) -> None:
        self.where, self.rank = where, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "weight" and trainer.global_step == 1 and trainer.global_rank == self.rank:
            with torch.no_grad():
                next(pl_module.parameters())[0].fill_(float("nan"))

    def on_after_backward(self, trainer, pl_module):
        if self.where == "grad" and trainer.global_step == 1 and trainer.global_rank == self.rank:
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = float("nan")


def nonfinite(where: str, rank: int, world: int, skip: int = 0):
    guard = NonFiniteGuard(skip_nonfinite=skip)
    try:
        result = fit(PP2, world, 3, callbacks=[guard, Inject(where, rank)], log_every_n_steps=1)
    except NonFiniteStep as error:
        return str(error)
    return {"skipped": guard.skipped, "finite": all(bool(torch.isfinite(p).all()) for p in result["params"].values())}


def read_names(folder: str) -> list:
    """Runs a pp=2 fine-tune from `folder`, recording which tensors of the folder this rank reads."""
    from lightning_attn_parallel.models.hf import Checkpoint

    names, read = [], Checkpoint.read

    def recording(self, name, index):
        names.append(name)
        return read(self, name, index)

    Checkpoint.read = recording
    try:
        result = fit(PP2, 2, 2, pretrained=folder)
    finally:
        Checkpoint.read = read
    result["read"] = sorted(set(names))
    return result


def _worker(rank: int, world: int, root: str) -> dict:
    callbacks = default_callbacks(log_every_n_steps=1, peak_tflops=1.0, run_dir=f"{root}/run")
    out = {"metrics": fit(PP2, world, 2, callbacks, validate=True, log_every_n_steps=1)}
    out["metrics"]["history"] = [dict(next(c for c in callbacks if isinstance(c, kind)).history)
                                 for kind in (ThroughputCallback, MemoryCallback, LoadBalanceCallback)]
    out["full"] = fit(PP2, world, FINAL_STEP, export_to=f"{root}/end")
    out["saved"] = fit(PP2, world, SAVE_STEP, save_path=f"{root}/pp2")
    out["resumed"] = fit(PP2, world, FINAL_STEP, ckpt_path=f"{root}/pp2")
    out["as_pp1"] = fit(NO_PP, world, FINAL_STEP, ckpt_path=f"{root}/pp2")
    out["resumed_to_3"] = fit(PP2, world, SAVE_STEP + 1, ckpt_path=f"{root}/pp2")  # pp=4's reference
    out["tuned_pp"] = read_names(f"{root}/hf")
    out["tuned"] = fit(NO_PP, world, 2, pretrained=f"{root}/hf")
    # last: a run that stops leaves its process group to the next one only if it stopped cleanly
    out["nan_weight"] = nonfinite("weight", 0, world)
    out["nan_grad"] = nonfinite("grad", 1, world)
    out["nan_grad_skipped"] = nonfinite("grad", 1, world, skip=1)
    return out


def _pp4_worker(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    return fit(dict(pp=4, pp_microbatches=4), world, SAVE_STEP + 1, ckpt_path=f"{root}/pp2")


def save_hf_folder(folder) -> None:
    """A random tiny Llama written by transformers itself (fp32)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=TINY["vocab_size"], hidden_size=TINY["d_model"],
                                      intermediate_size=TINY["ffn_dim"], num_hidden_layers=TINY["n_layers"],
                                      num_attention_heads=TINY["n_heads"], num_key_value_heads=TINY["n_kv_heads"],
                                      max_position_embeddings=TINY["max_seq_len"], tie_word_embeddings=False,
                                      rms_norm_eps=1e-5)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_loop")
    save_hf_folder(root / "hf")
    return root, run_distributed(_worker, 2, str(root), timeout=400)


def one_process(max_steps: int, validate: bool = False) -> dict:
    module, recorder = make_module(), LossRecorder()
    trainer = quiet_trainer(devices=1, max_steps=max_steps, callbacks=[recorder], limit_train_batches=PER_EPOCH,
                            limit_val_batches=2 if validate else 0)
    trainer.fit(module, loader(FixedTokens(), ROWS), loader(FixedTokens(seed=1), ROWS) if validate else None)
    return {"losses": recorder.losses, "params": params_of(module),
            "val": float(trainer.callback_metrics["val/loss"]) if validate else None}


def union(results: list, key: str) -> dict:
    return {k: v for result in results for k, v in result[key]["params"].items()}


# --------------------------------------------------------------------------- metrics and validation
def test_throughput_mfu_memory_and_balance_count_the_pipeline_once(runs):
    """The standard callbacks under pp=2: tokens/s x step time is the batch's token count (as
    without pp, not pp times it); TFLOP/s per GPU x world / tokens/s is the whole model's FLOPs per
    token; memory and balance figures come from both ranks, each rank's attention FLOPs being its
    own blocks'; the run report is written."""
    root, results = runs
    whole = build_model(ModelConfig(**TINY))
    flops = whole.flops_per_token(SEQ)
    attention = attention_flops_per_token(whole.config, SEQ)
    for rank, result in enumerate(results):
        throughput, memory, balance = result["metrics"]["history"]
        assert sorted(throughput) == [1, 2], throughput.keys()
        for step, values in throughput.items():
            tokens = values[m.TOKENS_PER_S] * values[m.STEP_TIME_S]
            assert tokens == pytest.approx(ROWS * SEQ, rel=1e-9), (rank, step, tokens)
            per_token = values[m.TFLOPS_PER_GPU] * 1e12 * 2 / values[m.TOKENS_PER_S]
            assert per_token == pytest.approx(flops, rel=1e-9), (per_token, flops)
            assert values[m.MFU] == pytest.approx(values[m.TFLOPS_PER_GPU], rel=1e-12)  # peak 1 TFLOP/s
        for values in memory.values():
            assert values[m.MEMORY_PEAK_ALLOCATED] > 0
            assert values[m.per_rank(m.MEMORY_PEAK_ALLOCATED, 1)] > 0
        for values in balance.values():
            assert [values[m.per_rank(m.BALANCE_TOKENS, r)] for r in (0, 1)] == [ROWS * SEQ] * 2
            per_rank = [values[m.per_rank(m.BALANCE_ATTENTION_TFLOP, r)] for r in (0, 1)]
            assert min(per_rank) > 0
            assert sum(per_rank) * 1e12 == pytest.approx(ROWS * SEQ * attention, rel=1e-9)
    summary = (root / "run" / "report" / "summary.md").read_text()
    assert m.TOKENS_PER_S in summary and m.TRAIN_LOSS in summary


def test_validation_under_pp_equals_one_process(runs):
    """The forward-only schedule over two validation batches: the same val loss, and the
    training around it the same losses and weights."""
    _, results = runs
    reference = one_process(2, validate=True)
    for result in results:
        got = result["metrics"]
        assert abs(got["val"] - reference["val"]) < 1e-10 * abs(reference["val"]), (got["val"], reference["val"])
        assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"]), rtol=1e-10, name="losses")
    for key, value in union(results, "metrics").items():
        assert_close(value, reference["params"][key], rtol=1e-10, name=key)


# --------------------------------------------------------------------------- the non-finite check
def test_nan_on_one_stage_is_named_on_every_rank(runs):
    """A NaN weight in stage 0 makes the loss NaN on the last stage, which shares it: every rank
    stops at step 2 naming the loss on both ranks. A NaN gradient on stage 1 alone (the loss is
    finite) stops both ranks naming the gradient norm on rank 1 only, or, under skip_nonfinite=1,
    is skipped by both (the weights stay finite)."""
    _, results = runs
    for result in results:
        assert result["nan_weight"].startswith("step 2 is not finite: loss on ranks 0, 1"), result["nan_weight"]
        assert result["nan_grad"].startswith("step 2 is not finite: gradient norm on rank 1;"), result["nan_grad"]
        # skip_nonfinite=1: both stages drop step 2's gradients (the other stage's are finite)
        assert result["nan_grad_skipped"] == {"skipped": [2], "finite": True}, result["nan_grad_skipped"]


# --------------------------------------------------------------------------- checkpoints
def test_resume_under_pp_equals_the_uninterrupted_run_exactly(runs):
    _, results = runs
    for rank, result in enumerate(results):
        full, resumed = result["full"], result["resumed"]
        assert result["saved"]["losses"] == full["losses"][:SAVE_STEP]
        assert resumed["losses"] == full["losses"][SAVE_STEP:], rank
        assert full["params"].keys() == resumed["params"].keys()
        for key, value in resumed["params"].items():
            assert torch.equal(value, full["params"][key]), f"rank {rank} {key}"


def test_pp2_checkpoint_continues_under_pp1(runs):
    """The pp=2 folder loads without pipelining (tp=2 on the same 2 ranks): the next batches' losses
    and the weights after them equal the uninterrupted pp=2 run's (model, optimizer and schedule)."""
    _, results = runs
    full = union(results, "full")
    for result in results:
        got = result["as_pp1"]
        assert_close(torch.tensor(got["losses"]), torch.tensor(result["full"]["losses"][SAVE_STEP:]), rtol=1e-10,
                     name="losses under pp=1")
        for key, value in got["params"].items():
            assert_close(value, full[key], rtol=1e-10, name=f"pp=1 {key}")


def test_pp2_checkpoint_continues_under_pp4(runs):
    """The pp=2 folder loads under pp=4 (4 ranks, one block each): each rank reads its block, and
    the next batch's loss equals the uninterrupted pp=2 run's (the weights after it too: the
    optimizer states came back)."""
    root, results = runs
    pp4 = run_distributed(_pp4_worker, 4, str(root), timeout=300)
    after, saved = union(results, "resumed_to_3"), union(results, "saved")
    blocks = [sorted({k.split(".")[2] for k in r["params"] if k.startswith("model.blocks.")}) for r in pp4]
    assert blocks == [["0"], ["1"], ["2"], ["3"]], blocks
    for result in pp4:
        assert_close(torch.tensor(result["losses"]), torch.tensor(results[0]["full"]["losses"][SAVE_STEP:SAVE_STEP + 1]),
                     rtol=1e-10, name="loss under pp=4")
        for key, value in result["start_params"].items():
            assert_close(value, saved[key], rtol=1e-12, name=f"loaded {key}")
        for key, value in result["params"].items():
            assert_close(value, after[key], rtol=1e-10, name=f"pp=4 {key}")


# --------------------------------------------------------------------------- Hugging Face folders
def test_export_from_pp_checkpoint_folder_gives_the_model_logits(runs, tmp_path):
    """The pp=2 folder (each stage wrote its blocks) exports one HF folder that transformers loads
    with the logits of the whole model the stages held together; so do the end-of-run exports of
    a pp=2 run (HF folder and consolidated file), which rank 0 writes with the other stage's
    tensors sent to it."""
    transformers = pytest.importorskip("transformers")
    from lightning_attn_parallel.export import export

    root, results = runs
    export(root / "pp2", tmp_path / "hf", dtype="fp32")
    tokens = torch.randint(TINY["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(3))
    for folder, key in ((tmp_path / "hf", "saved"), (root / "end_hf", "full")):
        model = build_model(ModelConfig(**TINY)).double()
        model.load_state_dict({k.removeprefix("model."): v for k, v in union(results, key).items()})
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        with torch.no_grad():
            assert_close(hf(tokens).logits.double(), model.logits(tokens), rtol=1e-5, name=f"{folder} logits")
    consolidated = torch.load(root / "end.pt", weights_only=True)
    full = union(results, "full")
    assert sorted(consolidated) == sorted(k.removeprefix("model.") for k in full)
    for key, value in full.items():
        assert_close(consolidated[key.removeprefix("model.")], value, rtol=1e-7, name=f"consolidated {key}")


def test_fine_tune_from_hf_under_pp_reads_only_each_stage(runs):
    """A pp=2 fine-tune from an HF folder: the model is built on the meta device, split, and each
    rank allocates and reads only its stage's tensors; it trains as without pipelining."""
    from lightning_attn_parallel.models.hf import hf_names, weight_specs

    _, results = runs
    specs = weight_specs(ModelConfig(**TINY))
    for rank, result in enumerate(results):
        got = result["tuned_pp"]
        held = {k.removeprefix("model.") for k in got["start_params"]}
        expected = sorted({n for name in held for n in hf_names(specs[name], 0)})
        assert got["read"] == expected, (rank, got["read"])
        assert ("tok_embeddings.weight" in held) == (rank == 0) and ("output.weight" in held) == (rank == 1)
        assert_close(torch.tensor(got["losses"]), torch.tensor(result["tuned"]["losses"]), rtol=1e-10,
                     name="fine-tune losses")
    tuned = union(results, "tuned")
    for key, value in union(results, "tuned_pp").items():
        assert_close(value, tuned[key], rtol=1e-10, name=f"fine-tuned {key}")
    assert set(results[0]["tuned_pp"]["read"]).isdisjoint(results[1]["tuned_pp"]["read"])


# --------------------------------------------------------------------------- torch version branches
class FakeSchedule:
    """A schedule whose `step` and `eval` name only the keywords given (the rest would reach the
    model through **kwargs, as torch's do)."""

    def __init__(self, step_names: tuple, eval_names: tuple | None) -> None:
        self.calls: list = []

        def make(kind, names):
            def call(*args, **kwargs):
                unknown = set(kwargs) - set(names)
                assert not unknown, f"{kind} got {unknown}"
                self.calls.append((kind, sorted(kwargs), torch.is_grad_enabled()))
            return call

        self.step = make("step", step_names)
        if eval_names is not None:
            self.eval = make("eval", eval_names)


def _signed(names: tuple):
    """A function whose signature names `names` and takes **kwargs (inspect reads it)."""
    namespace: dict = {}
    exec(f"def f(*args, {', '.join(n + '=None' for n in names)}, **kwargs): pass", namespace)
    return namespace["f"]


@pytest.mark.parametrize("step_names, eval_names, train, expected", [
    (("target", "losses", "return_outputs"), ("target", "losses"), True,
     ("step", ["losses", "return_outputs", "target"], True)),
    (("target", "losses"), ("target", "losses"), True, ("step", ["losses", "target"], True)),  # no return_outputs
    (("target", "losses", "return_outputs"), ("target", "losses"), False, ("eval", ["losses", "target"], True)),
    (("target", "losses", "return_outputs"), None, False,  # no eval: step without gradients
     ("step", ["losses", "return_outputs", "target"], False)),
    (("target", "losses", "return_outputs"), ("target",), False,  # an eval without losses
     ("step", ["losses", "return_outputs", "target"], False)),
])
def test_schedule_calls_follow_what_the_installed_torch_accepts(monkeypatch, step_names, eval_names, train, expected):
    """The branches of parallel/pipeline_schedule.py ask the signatures, not torch's version."""
    from lightning_attn_parallel.parallel import pipeline_schedule

    schedule = FakeSchedule(step_names, eval_names)
    signatures = {schedule.step: _signed(step_names)}
    if eval_names is not None:
        signatures[schedule.eval] = _signed(eval_names)
    real = pipeline_schedule.inspect.signature
    monkeypatch.setattr(pipeline_schedule.inspect, "signature", lambda fn: real(signatures.get(fn, fn)))
    pipeline_schedule.run_schedule(schedule, (), None, [], train)
    assert schedule.calls == [expected]


def test_installed_torch_has_what_the_schedules_need():
    """The installed torch's schedules take what run_schedule and build_schedule pass."""
    from lightning_attn_parallel.parallel.pipeline_schedule import SCHEDULES, _accepts

    for cls in SCHEDULES.values():
        assert _accepts(cls.__init__, "scale_grads"), cls
        assert _accepts(cls.step, "target") and _accepts(cls.step, "losses"), cls
