import dataclasses
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from skipjack.config import (
    ConfigError,
    LaunchConfig,
    RayLaunch,
    Schedule,
    SlurmLaunch,
    TorchrunLaunch,
    TrainJobConfig,
    derive_micro_batches,
    prepare,
    validate,
)
from skipjack.launch.ray import worker_config, worker_job
from skipjack.testing.cli import compose_config, compose_job


def test_default_job_is_valid():
    cfg = compose_job()
    assert isinstance(cfg, TrainJobConfig) and cfg.model.name == "tiny"
    prepare(cfg, 1)


@pytest.mark.parametrize(
    "overrides,world,field,fix",
    [
        (["train.steps=-5"], 1, "train.steps", "must be > 0"),
        (
            ["train.global_batch_size=12", "train.micro_batch_size=4"],
            2,
            "train.global_batch_size",
            "multiple of 8",
        ),
        (["model.n_heads=6"], 1, "model.n_heads", "pick a divisor"),
        (["model.n_kv_heads=3"], 1, "model.n_kv_heads", "pick a divisor"),
        (["data=indexed"], 1, "data.paths", "skipjack preprocess"),
        (
            ["data=indexed", "data.paths=[/nowhere/corpus]"],
            1,
            "data.paths",
            "/nowhere/corpus.bin does not exist",
        ),
        (["parallel.dp=3"], 2, "parallel.dp", "world size 2"),
        (["train.seq_len=4096"], 1, "train.seq_len", "max_seq_len"),
        (["data.split='98,0,2'"], 1, "data.split", "valid > 0"),
        (
            ["parallel.tp=2", "model.n_heads=6", "model.n_kv_heads=3", "model.dim=384"],
            2,
            "parallel.tp",
            "one must divide the other",
        ),
        (
            [
                "parallel.tp=2",
                "model.n_heads=4",
                "model.n_kv_heads=1",
                "model.dim=128",
                "optim=galore_plus",
            ],
            2,
            "optim.name",
            "kv heads replicated over tp",
        ),
        (
            [
                "parallel.tp=3",
                "model.n_heads=6",
                "model.n_kv_heads=6",
                "model.dim=384",
                "model.ffn_dim=770",
            ],
            3,
            "parallel.tp",
            "ffn_dim=770",
        ),
        (
            ["parallel.tp=2", "model.n_heads=3", "model.n_kv_heads=3", "model.dim=192"],
            2,
            "parallel.tp",
            "n_heads=3 is not divisible by tp=2",
        ),
        (
            ["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=255"],
            2,
            "train.seq_len",
            "sequence parallelism",
        ),
        (["parallel.tp=2"], 3, "parallel.tp", "world size 3"),
        (["parallel.vocab_parallel=alg2"], 1, "parallel.vocab_parallel", "needs pp > 1"),
        (["parallel.microbatches=3"], 1, "parallel.microbatches", "dp x microbatches = 3"),
        (
            ["parallel.pp=2", "parallel.vocab_parallel=alg2", "parallel.partition=redistribute"],
            2,
            "parallel.partition",
            "partition=even",
        ),
        (["parallel.pp=2", "model.tie_embeddings=true"], 2, "model.tie_embeddings", "vocab_par"),
        (["optim=galore", "optim.galore.density=0.1"], 1, "optim.galore.density", "galore_plus"),
        (["optim=galore_plus", "optim.galore.density=2"], 1, "optim.galore.density", "[0, 1]"),
        (
            ["optim=galore", "optim.galore.update_proj_gap=0"],
            1,
            "optim.galore.update_proj_gap",
            "> 0",
        ),
        (["optim=galore", "optim.galore.rank=-1"], 1, "optim.galore.rank", "by preset"),
        (["optim=galore", "optim.galore.rank=0"], 1, "optim.galore.rank", "density > 0"),
        (["launch=torchrun", "launch.nodes=2"], 1, "launch.rdzv_endpoint", "host:port"),
        (["launch=slurm", "launch.max_restarts=-1"], 1, "launch.max_restarts", ">= 0"),
        (["launch=ray", "launch.num_workers=0"], 1, "launch.num_workers", "> 0"),
        (["checkpoint.memory.interval=-1"], 1, "checkpoint.memory.interval", ">= 0"),
        (["checkpoint.memory.linger=0"], 1, "checkpoint.memory.linger", "> 0"),
        (
            ["launch=ray", "checkpoint.memory.interval=1", "checkpoint.memory.agent=launcher"],
            1,
            "checkpoint.memory.agent",
            "agent=trainer",
        ),
        (
            [
                "optim=galore_plus",
                "optim.galore.residual_rebuild=true",
                "optim.galore.update_proj_gap=10",
            ],
            1,
            "optim.galore.residual_rebuild",
            "before the next one",
        ),
        (
            ["optim=galore", "optim.galore.residual_rebuild=true"],
            1,
            "optim.galore.residual_rebuild",
            "galore_plus",
        ),
        (
            ["checkpoint.memory.interval=1", "checkpoint.memory.root=/no/such"],
            1,
            "checkpoint.memory.root",
            "give a tmpfs",
        ),
        *[
            (
                ["parallel.pp=2", "parallel.skippipe.enabled=true", f"parallel.skippipe.{o}"],
                2,
                f"parallel.skippipe.{o.split('=')[0]}",
                fix,
            )
            for o, fix in [
                ("skip_ratio=1.0", "[0, 1)"),
                ("max_swaps=-1", ">= 0"),
                ("memory=0", "> 0"),
                ("full_pipeline_every=-1", "0: never"),
                ("network=moon.csv", "not one of none, cluster, multi_cluster, geo"),
                ("compute_tflops=-1", "0: measured"),
            ]
        ],  # fmt: skip
        (["parallel.skippipe.enabled=true"], 1, "parallel.skippipe.enabled", "needs pp >= 2"),
        (
            ["parallel.pp=2", "parallel.skippipe.enabled=true", "parallel.vocab_parallel=alg2"],
            2,
            "parallel.skippipe.enabled",
            "parallel.vocab_parallel=none",
        ),
        (
            ["parallel.pp=2", "parallel.skippipe.enabled=true", "parallel.partition=redistribute"],
            2,
            "parallel.partition",
            "on the data node",
        ),
        (["regime=est", "regime.est.p_layers=0"], 1, "regime.est.p_layers", "(0, 1]"),
        (
            ["regime=est", "regime.est.stage1_until=0.8", "regime.est.stage2_until=0.5"],
            1,
            "regime.est.stage2_until",
            "in order",
        ),
        (["regime=sat", "regime.sat.ladder=[[0.5,0.5]]"], 1, "regime.sat.ladder", "at 1.0"),
        (["regime=sat", "regime.sat.ladder=[[1.0,1.0]]"], 1, "regime.sat.ladder[0]", "[0, 1)"),
        (["regime=sat", "regime.sat.decay=1"], 1, "regime.sat.decay", "[0, 1)"),
        (["data=sft"], 1, "data.paths", "jsonl"),
        (["data=sft", "data.paths=[/no/such.jsonl]"], 1, "data.paths", "does not exist"),
        (["eval.stages=[0]", "eval.layers=[1]"], 1, "eval.stages", "not both"),
        (["eval.layers=[4]"], 1, "eval.layers", "not layers of a 4-layer model"),
    ],
)
def test_invalid_values_fail_naming_field_and_fix(overrides, world, field, fix):
    cfg = compose_job(*overrides)
    with pytest.raises(ConfigError) as err:
        prepare(cfg, world)
    assert err.value.field_name == field
    assert fix in str(err.value)


@pytest.mark.parametrize(
    "recipe,more",
    [
        ("pretrain_llama_130m_galore_plus", []),
        ("continual_pretrain_sat", []),
        ("sft_from_hf", ["data.paths=[{records}]", "train.seq_len=512"]),
    ],
)
def test_every_recipe_composes_into_a_valid_job(tmp_path, recipe, more):
    records = tmp_path / "chat.jsonl"
    records.write_text('{"prompt": "a", "response": "b"}\n')
    cfg = compose_job(f"experiment={recipe}", *(m.format(records=records) for m in more))
    prepare(cfg, 1)


def composition_error(*overrides: str) -> str:
    """What Hydra says (with its cause, as the CLI prints it) when composing fails."""
    with pytest.raises(ConfigCompositionException) as err:
        compose_job(*overrides)
    return f"{err.value}\n{err.value.__cause__}"


@pytest.mark.parametrize(
    "key,value,choices",
    [
        ("parallel.schedule", "zigzag", "gpipe, 1f1b, interleaved_1f1b"),
        ("parallel.partition", "uneven", "even, redistribute"),
        ("parallel.vocab_parallel", "alg3", "none, alg1, alg2"),
        ("train.device", "tpu", "auto, cpu, cuda"),
        ("train.dtype", "fp8", "fp32, bf16"),
        ("optim.name", "lion", "adamw, galore, galore_plus"),
        ("optim.galore.proj_type", "diag", "std, reverse_std, left, right"),
        ("optim.galore.moments", "drop", "keep, reset, rotate"),
        ("optim.galore.svd", "lanczos", "exact, rsi"),
        ("logging.wandb_mode", "cloud", "offline, online, disabled"),
        ("data.kind", "parquet", "builtin, indexed, sft"),
        ("model.hf_dtype", "fp8", "fp32, bf16, fp16"),
    ],
)
def test_a_wrong_choice_is_refused_when_composing_naming_the_key_and_the_choices(
    key, value, choices
):
    said = composition_error(f"{key}={value}")
    assert f"Invalid value '{value}', expected one of [{choices}]" in said
    assert f"full_key: {key}\n" in said


def test_a_wrong_choice_in_a_config_file_is_refused_too(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "ntk.yaml").write_text(
        "# @package _global_\nmodel:\n  rope_scaling:\n    rope_type: ntk\n    factor: 2.0\n"
    )
    said = composition_error(f"hydra.searchpath=[file://{tmp_path}]", "experiment=ntk")
    assert "In 'experiment/ntk'" in said
    assert "Invalid value 'ntk', expected one of [llama3, linear, yarn]" in said
    assert "full_key: model.rope_scaling.rope_type\n" in said


def test_choices_are_their_strings_in_code_yaml_and_the_ray_workers_config():
    overrides = ["parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b"]
    cfg = compose_config(*overrides, "parallel.vocab_parallel=alg2", "optim=galore")
    job = OmegaConf.to_object(cfg)
    p = job.parallel
    assert p.schedule is Schedule.interleaved_1f1b and p.schedule == "interleaved_1f1b"
    assert {"none": 0, "alg2": 2}[p.vocab_parallel] == 2  # a member hashes as its string
    assert f"{p.schedule}/{job.optim.name}" == "interleaved_1f1b/galore"
    text = OmegaConf.to_yaml(cfg, resolve=True)  # config.yaml of a run
    assert "schedule: interleaved_1f1b\n" in text and "vocab_parallel: alg2\n" in text
    reread = OmegaConf.merge(OmegaConf.structured(TrainJobConfig), OmegaConf.create(text))
    assert OmegaConf.to_object(reread) == job
    plain = worker_config(cfg)
    assert type(plain["parallel"]["schedule"]) is str and plain["launch"] == {}
    assert OmegaConf.to_object(worker_job(plain)) == job


@pytest.mark.parametrize(
    "launcher,schema",
    [
        ("local", LaunchConfig),
        ("torchrun", TorchrunLaunch),
        ("slurm", SlurmLaunch),
        ("ray", RayLaunch),
    ],
)
def test_each_launcher_has_its_own_schema_with_only_its_fields(launcher, schema):
    cfg = compose_config(f"launch={launcher}")
    assert type(OmegaConf.to_object(cfg).launch) is schema
    assert set(cfg.launch) == {f.name for f in dataclasses.fields(schema)}
    worker = OmegaConf.to_object(worker_job(worker_config(cfg)))
    assert type(worker.launch) is LaunchConfig  # a Ray worker trains here, it does not launch


def test_a_field_of_another_launcher_is_refused():
    job = compose_job("launch=slurm", "launch.partition=gpu", "launch.nodes=2")
    assert job.launch == SlurmLaunch(partition="gpu", nodes=2)
    for launcher, schema in (("local", "LaunchConfig"), ("ray", "RayLaunch")):
        said = composition_error(f"launch={launcher}", "launch.partition=gpu")
        assert f"Key 'partition' not in '{schema}'" in said and "full_key: launch.partition" in said
    assert "not in 'SlurmLaunch'" in composition_error("launch=slurm", "launch.num_workers=4")


def test_microbatches_decide_the_micro_batch_size():
    cfg = compose_job("parallel.microbatches=4", "train.global_batch_size=16")
    derive_micro_batches(cfg, 2)  # dp=2: 2 replicas x 4 micro-batches of 2 sequences
    assert cfg.train.micro_batch_size == 2
    prepare(cfg, 2)
    both = compose_job("parallel.microbatches=4", "train.micro_batch_size=4")
    with pytest.raises(ConfigError, match="train.micro_batch_size: 4 contradicts"):
        prepare(both, 1)


@pytest.mark.parametrize(
    "overrides,world,micro_batch_size,notice",
    [
        ([], 1, 8, False),  # the default job: one micro-batch of the global batch of 8
        (["parallel.dp=2"], 2, 4, False),
        (["parallel.tp=2"], 2, 8, False),
        (["parallel.pp=2"], 2, 2, False),  # 4 = 2 x pp micro-batches fill the pipeline
        (["parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b"], 2, 2, False),
        (["parallel.pp=4"], 4, 1, False),
        (["parallel.pp=2", "parallel.vocab_parallel=alg2"], 2, 2, False),
        (["parallel.pp=4", "parallel.dp=2"], 8, 1, True),  # 4 per replica: the most there is
        (["parallel.pp=2", "train.global_batch_size=6"], 2, 1, False),  # 6 >= 4 divides 6
        (["parallel.pp=4", "train.global_batch_size=24"], 4, 3, False),
    ],
)
def test_auto_micro_batches_fit_every_layout_added_to_the_default_job(
    overrides, world, micro_batch_size, notice
):
    cfg = compose_job(*overrides)
    said = prepare(cfg, world)
    assert cfg.train.micro_batch_size == micro_batch_size
    assert (said is not None) == notice
    if notice:
        assert "raise train.global_batch_size to 16" in said


def test_explicit_micro_batch_size_wins_and_an_impossible_one_names_the_knob():
    cfg = compose_job("parallel.pp=2", "train.micro_batch_size=4")
    prepare(cfg, 2)
    assert cfg.train.micro_batch_size == 4
    interleaved = ["parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b"]
    with pytest.raises(ConfigError, match="train.micro_batch_size: .*multiple of 2"):
        prepare(compose_job(*interleaved, "train.micro_batch_size=8"), 2)
    with pytest.raises(ConfigError, match="train.global_batch_size: 3 gives 3 sequences"):
        prepare(compose_job(*interleaved, "train.global_batch_size=3"), 2)
    with pytest.raises(ConfigError, match="train.micro_batch_size: 'many'"):
        prepare(compose_job("train.micro_batch_size=many"), 1)


def test_unknown_keys_and_presets_are_refused_by_the_schema():
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises(MissingConfigException, match="model/llama_7m"):
        compose_job("model=llama_7m")
    with pytest.raises(ConfigCompositionException, match="stepz"):
        compose_job("train.stepz=5")


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "skipjack.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def test_cli_prints_one_line_error_and_exits_2():
    result = cli("train", "train.steps=-1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "skipjack: config error: train.steps: must be > 0, got -1"


def test_cli_unknown_preset_lists_the_available_ones():
    result = cli("train", "model=llama_7m")
    assert result.returncode != 0
    assert "Could not find 'model/llama_7m'" in result.stderr and "tinyllama_1_1b" in result.stderr


def test_cli_cfg_job_and_help_work_as_in_hydra():
    shown = cli("train", "--cfg", "job", "model=llama_60m", "optim.lr=3e-4", "train.steps=500")
    assert shown.returncode == 0, shown.stderr
    cfg = OmegaConf.create(shown.stdout)
    assert cfg.model.name == "llama_60m" and cfg.optim.lr == 3e-4 and cfg.train.steps == 500
    helped = cli("train", "--help")
    assert helped.returncode == 0 and "model: " in helped.stdout and "llama3_8b" in helped.stdout
    assert cli("preprocess", "--help").returncode == 0
    assert cli("bogus").returncode == 2


def test_validation_does_not_derive():
    """Deriving is its own step (derive_micro_batches, or prepare = derive then validate)."""
    cfg = compose_job("parallel.pp=2")
    with pytest.raises(ConfigError, match="train.micro_batch_size: 'auto' is not derived yet"):
        validate(cfg, 2)
    assert cfg.train.micro_batch_size == "auto"
    derive_micro_batches(cfg, 2)
    validate(cfg, 2)
    assert cfg.train.micro_batch_size == 2
