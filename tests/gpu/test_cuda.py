"""The single-GPU paths: bf16 autocast, NCCL, fused AdamW, MFU, GaLore+, checkpoints and the
memory tier's staging on CUDA.

Skipped without CUDA (tests/conftest.py); `bash bench/gpu_check.sh` runs them. Each checks only
what differs on CUDA; the CPU suite covers the rest of the same paths: the default job through the
CLI (tests/test_end_to_end.py), GaLore+'s bases (tests/optim) and bitwise resume
(tests/checkpoint).
"""

import math
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from skipjack.config import OptimConfig, ParallelConfig, TrainConfig, TrainJobConfig
from skipjack.launch.env import device_for_rank, init_distributed
from skipjack.models.llama import Llama, preset
from skipjack.optim.builder import build_optimizer
from skipjack.parallel.dims import ParallelDims
from skipjack.testing.cli import compose_job, run_skipjack
from skipjack.testing.reference import build_run, checkpointed_run, tiny_config
from skipjack.trainer.metrics import Metrics, peak_flops, read_metrics
from skipjack.trainer.trainer import train_step

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_world():
    """This process as a world of one on its GPU, with NCCL, as `skipjack train` starts it."""
    device = device_for_rank("cuda")
    init_distributed(device)
    yield device
    dist.destroy_process_group()


def test_default_job_in_bf16_through_the_cli(tmp_path):
    overrides = ("train.device=cuda", "train.dtype=bf16", "logging.plot=false")
    result = run_skipjack("train", "experiment=smoke", *overrides, cwd=tmp_path)
    assert "on cuda:0" in result.stdout
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 1.0  # as on CPU (tests/test_end_to_end.py)
    assert all(r["peak_memory_bytes"] > 0 for r in steps)
    if peak_flops(torch.device("cuda")) is not None:
        assert all(0 < r["mfu"] < 1 for r in steps)


def test_llama_1b_steps_report_mfu_with_fused_adamw(cuda_world, tmp_path):
    device = cuda_world
    if peak_flops(device) is None:
        pytest.skip(f"no bf16 peak known for {torch.cuda.get_device_name(device)}: add it to "
                    "trainer/metrics.py PEAK_BF16_FLOPS")  # fmt: skip
    steps, batch, seq_len = 4, 4, 1024
    job = TrainJobConfig(
        model=preset("llama_1b"),
        parallel=ParallelConfig(),
        optim=OptimConfig(),
        train=TrainConfig(
            steps=steps, global_batch_size=batch, micro_batch_size=batch, seq_len=seq_len
        ),
    )
    assert job.train.dtype == "bf16"
    dims, loader, engine = build_run(job, 0, device)
    assert engine.optimizer.defaults["fused"]
    assert all(p.device == device and p.dtype == torch.float32 for p in engine.model.parameters())
    metrics = Metrics(tmp_path, steps, device, True, progress=False)
    records = []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        result = train_step(engine, loader, step)
        records.append(metrics.step(step, batch * seq_len, time.perf_counter() - started, result))
    metrics.close()
    # random tokens: the loss starts near ln(vocab) and stays finite
    assert abs(records[0]["loss"] - math.log(job.model.vocab_size)) < 1.0
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert all(0 < r["mfu"] < 1 for r in records[1:]), [r["mfu"] for r in records]
    assert [r["mfu"] for r in read_metrics(tmp_path)] == [r["mfu"] for r in records]


def _galore_plus_bases(device: torch.device, grads: dict, groups: dict) -> tuple[dict, dict]:
    """GaLore+ as shipped (refresh every 2 steps, residuals from step 1) for 3 steps of the fixed
    `grads` on a tiny model on `device`; every projection basis, and the weights."""
    cfg = tiny_config()
    model = Llama(cfg, tp=ParallelDims(dp=1).tensor_parallel()).init_weights(0, device)
    optim = compose_job("optim=galore_plus", "optim.galore.update_proj_gap=2").optim
    optim.galore.residual_warmup = 1
    optimizer = build_optimizer(model, optim, device, cfg, groups)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for name, p in model.named_parameters():
                p.grad = grads[name].to(device)
            optimizer.step()
    assert not [w for w in caught if "GaLore" in str(w.message)], caught  # no fallback basis
    bases = {n: optimizer.state[p]["projector"].cpu() for n, p in model.named_parameters()
             if "projector" in optimizer.state[p]}  # fmt: skip
    return bases, {n: p.detach().cpu() for n, p in model.named_parameters()}


def test_galore_plus_refresh_on_cuda_matches_the_cpu(cuda_world):
    cfg = tiny_config()
    model = Llama(cfg, tp=ParallelDims(dp=1).tensor_parallel()).init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    (model(tokens).float().pow(2).sum() * 1e-3).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    groups = ParallelDims(dp=1).build_groups(cuda_world.type).groups
    on_cpu, cpu_weights = _galore_plus_bases(torch.device("cpu"), grads, groups)
    on_cuda, cuda_weights = _galore_plus_bases(cuda_world, grads, groups)
    assert on_cpu.keys() == on_cuda.keys() and len(on_cpu) == 2 * 7  # 2 layers x 7 matrices
    for name, basis in on_cuda.items():
        eye = torch.eye(basis.shape[1])
        torch.testing.assert_close(basis.T @ basis, eye, atol=1e-4, rtol=0, msg=name)
        sines = torch.linalg.svdvals(on_cpu[name] - basis @ (basis.T @ on_cpu[name]))
        assert float(sines.max()) < 1e-3, name  # the same subspace as on the CPU
    for name, w in cuda_weights.items():
        assert torch.isfinite(w).all(), name
        moved = float((w - cpu_weights[name]).norm() / cpu_weights[name].norm())
        assert moved < 1e-2, (name, moved)


def test_checkpoint_save_and_resume_on_cuda_is_bitwise(cuda_world, tmp_path):
    """bf16 autocast; deterministic kernels (SDPA's backward is not by default), so the straight
    run is reproducible and any difference is the checkpoint's."""
    cfg = tiny_config(n_layers=4)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        run = {"device": cuda_world, "dtype": "bf16"}
        straight = checkpointed_run(cfg, 8, str(tmp_path / "a"), 4, "none", **run)
        step4 = str(tmp_path / "a" / "step-0000004")
        resumed = checkpointed_run(cfg, 8, str(tmp_path / "b"), 0, step4, **run)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(math.isfinite(v) for v in straight.values())
    assert all(resumed[s] == straight[s] for s in resumed), (straight, resumed)


class CudaWeights:
    """A state part holding one CUDA tensor, restored in place."""

    def __init__(self, value: float, device: torch.device):
        self.w = torch.full((4096, 4096), value, device=device)  # 64 MiB

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        assert state["w"] is self.w


def test_memory_tier_stages_cuda_state_and_restores_it_bitwise(cuda_world, tmp_path, monkeypatch):
    """The memory tier's GPU path: a snapshot of CUDA tensors goes through pinned buffers and
    the background writer; what changes after `before_update` is not in it; the newest
    snapshot restores into the CUDA tensors in place, bitwise; closing leaves nothing."""
    from skipjack.checkpoint.memory import MemoryTier
    from skipjack.checkpoint.state import Progress
    from skipjack.config import CheckpointConfig
    from skipjack.config.checkpoint import MemoryConfig

    monkeypatch.setenv("SKIPJACK_JOB_ID", f"gpu-memory-{time.time_ns()}")
    memory = MemoryConfig(interval=1, ranks_per_node=1, root=str(tmp_path))
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"), memory=memory)
    tier = MemoryTier(cfg, ParallelDims(dp=1).build_groups())
    weights = CudaWeights(0.0, cuda_world)
    for step in (1, 2):
        weights.w.normal_()
        expected = weights.w.cpu()
        tier.save(step, {"model": weights, "trainer": Progress(step)})
        assert tier._staging.staged
        assert all(b.is_pinned() for b in tier._staging.buffers.values())
        tier.before_update()  # the copy in flight is done: the update may change the weights
        weights.w.add_(1.0)
    tier.wait()
    restored = CudaWeights(7.0, cuda_world)
    progress = Progress()
    assert tier.newest() == 2
    tier.load({"model": restored, "trainer": progress})
    assert progress.step == 2
    assert torch.equal(restored.w.cpu(), expected)
    directory = tier.directory
    tier.close()
    assert not directory.parent.exists()
