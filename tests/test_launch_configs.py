"""The accelerate launch configs and the SLURM script: they parse, accelerate accepts them, and
the CPU config really starts 2 gloo processes that can all-reduce."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
SBATCH = ROOT / "scripts" / "slurm_multinode.sbatch"

# name -> (distributed_type, num_processes, num_machines)
EXPECTED = {
    "cpu_2proc": ("MULTI_GPU", 2, 1),  # MULTI_GPU = torchrun launcher; ACCELERATE_USE_CPU=1 makes it gloo
    "gpu_1": ("NO", 1, 1),
    "gpu_8": ("MULTI_GPU", 8, 1),
    "multinode_4x8": ("MULTI_GPU", 32, 4),
    "deepspeed_zero1": ("DEEPSPEED", 2, 1),  # accelerate's DeepSpeed plugin; the recipe runs engine=deepspeed
}

# Keys the recipe owns. A config that sets them would fight the trainer's derived values.
RECIPE_OWNED = {"gradient_accumulation_steps", "split_batches", "dispatch_batches", "fp16", "dynamo_backend"}


def _path(name: str) -> Path:
    return CONFIGS / f"{name}.yaml"


def test_every_config_is_expected():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_and_accelerate_accepts_it(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    raw = yaml.safe_load(_path(name).read_text())
    assert isinstance(raw, dict)
    assert raw["compute_environment"] == "LOCAL_MACHINE"
    assert raw["mixed_precision"] == "no"  # the recipe owns precision (model.precision)
    assert raw["dynamo_config"] == {"dynamo_backend": "NO"}  # the recipe owns model.compile
    assert not RECIPE_OWNED & set(raw), f"{name} sets recipe-owned keys {RECIPE_OWNED & set(raw)}"

    # The same loader `accelerate launch --config_file` uses; it rejects unknown keys.
    cfg = load_config_from_file(str(_path(name)))
    assert isinstance(cfg, ClusterConfig)
    dtype, nproc, nmach = EXPECTED[name]
    assert cfg.distributed_type == DistributedType(dtype)
    assert cfg.num_processes == nproc
    assert cfg.num_machines == nmach
    assert cfg.machine_rank == 0
    assert cfg.mixed_precision == "no"
    assert cfg.gpu_ids == "all"
    assert cfg.use_cpu is (name == "cpu_2proc")
    assert nproc % nmach == 0


def _resolved_launch_args(config: Path, *flags: str):
    """What `accelerate launch` makes of the config plus flags, without starting anything."""
    launch = pytest.importorskip("accelerate.commands.launch")
    if not hasattr(launch, "_validate_launch_command"):
        pytest.skip("accelerate moved its private _validate_launch_command")
    parser = launch.launch_command_parser()
    args = parser.parse_args(["--config_file", str(config), *flags, "-m", "goyal_recipe.cli", "train", "r.yaml"])
    args, _, _ = launch._validate_launch_command(args)
    return args


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launcher_resolves_config(name):
    args = _resolved_launch_args(_path(name))
    dtype, nproc, nmach = EXPECTED[name]
    assert args.num_processes == nproc
    assert args.mixed_precision == "no"
    assert args.dynamo_backend.upper() == "NO"
    assert not args.cpu  # `--cpu` would select the single-process launcher
    # MULTI_GPU configs go through torchrun (multi_gpu_launcher), which starts num_processes workers.
    assert args.multi_gpu is (dtype == "MULTI_GPU")
    assert args.module and args.training_script == "goyal_recipe.cli"
    assert args.training_script_args == ["train", "r.yaml"]


def test_multinode_flags_override_placeholders():
    args = _resolved_launch_args(
        _path("multinode_4x8"),
        "--machine_rank", "3", "--main_process_ip", "10.1.2.3", "--main_process_port", "29999",
    )
    assert (args.num_processes, args.num_machines, args.machine_rank) == (32, 4, 3)
    assert (args.main_process_ip, args.main_process_port) == ("10.1.2.3", 29999)
    assert args.rdzv_backend == "static"
    # Without the flag the placeholder stays, and it can never resolve.
    assert _resolved_launch_args(_path("multinode_4x8")).main_process_ip.endswith(".invalid")


def test_sbatch_syntax_and_content():
    bash = shutil.which("bash")
    assert bash, "bash is needed to check the SLURM script"
    subprocess.run([bash, "-n", str(SBATCH)], check=True, timeout=30)
    text = SBATCH.read_text()
    for needle in ("accelerate launch", "--machine_rank", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                   "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=", "scontrol show hostnames",
                   "accelerate_configs/multinode_4x8.yaml", "recipes/resnet50_kn8k.yaml",
                   "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE"):
        assert needle in text, needle
    # NCCL hints stay commented: their values depend on the machine.
    assert not [ln for ln in text.splitlines() if ln.lstrip().startswith("export NCCL_")]


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_sbatch_runs_one_launch_per_node_with_its_rank(tmp_path):
    """Run the script with stub srun/scontrol/accelerate. Each node must get its own
    --machine_rank (SLURM_NODEID expanded inside the task, not in the batch shell)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "launches.jsonl"
    _stub(bin_dir, "scontrol", """\
        [[ "$1 $2" == "show hostnames" ]] || exit 2
        # one line at a time, as a long list comes: a reader that stops after the first kills this with SIGPIPE
        for host in gpu-a01 gpu-a02 gpu-a03 gpu-a04; do echo "$host"; sleep 0.05; done
    """)
    _stub(bin_dir, "srun", """\
        while [[ "$1" == -* ]]; do shift; done       # options are all --key=value
        for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" || exit $?; done
    """)
    accelerate = bin_dir / "accelerate"  # records its node and arguments, starts nothing
    accelerate.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'node': os.environ['SLURM_NODEID'], 'argv': sys.argv[1:]}) + '\\n')\n"
    )
    accelerate.chmod(accelerate.stat().st_mode | stat.S_IXUSR)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "VENV": "",  # do not put the repository's .venv (with the real accelerate) first on PATH
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_NODELIST": "gpu-a[01-04]",
        "SLURM_NNODES": "4",
        "SLURM_JOB_ID": "4242",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_NODEID": "0",  # what the batch shell sees on the first node
        "DATA_ROOT": "/datasets/imagenet",
    }
    done = subprocess.run(["bash", str(SBATCH), "optim.warmup=constant"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    launches = [json.loads(line) for line in log.read_text().splitlines()]
    assert [launch["node"] for launch in launches] == ["0", "1", "2", "3"]
    for launch in launches:
        argv = launch["argv"]
        assert argv[0] == "launch"

        def flag(name, argv=argv):
            return argv[argv.index(name) + 1]

        assert flag("--machine_rank") == launch["node"]
        assert flag("--num_machines") == "4"
        assert flag("--num_processes") == "32"
        assert flag("--main_process_ip") == "gpu-a01"
        assert flag("--main_process_port") == str(20000 + 4242 % 20000)
        assert flag("--config_file") == "accelerate_configs/multinode_4x8.yaml"
        tail = argv[argv.index("-m") + 1:]
        assert tail[:3] == ["goyal_recipe.cli", "train", "recipes/resnet50_kn8k.yaml"]
        assert "data.root=/datasets/imagenet" in tail
        assert "run.name=resnet50_kn8k_4x8_4242" in tail
        assert tail[-1] == "optim.warmup=constant"


WORKER = """\
import json, os, sys
import torch
import torch.distributed as dist
from accelerate import Accelerator

acc = Accelerator()  # what the trainer's engine does; reads ACCELERATE_USE_CPU
assert dist.is_initialized(), "no process group: accelerate chose distributed_type NO"
t = torch.tensor([float(dist.get_rank())])
dist.all_reduce(t)  # sum of ranks over the group
out = {
    "world_size": dist.get_world_size(),
    "rank": dist.get_rank(),
    "sum": t.item(),
    "backend": str(dist.get_backend()),
    "distributed_type": str(acc.distributed_type.value),
    "num_processes": acc.num_processes,
    "mixed_precision": acc.mixed_precision,
}
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(out, f)
acc.end_training()  # destroys the process group: a rank leaving with live gloo threads can abort
"""


def _accelerate_bin() -> str:
    beside = Path(sys.executable).parent / "accelerate"
    if beside.exists():
        return str(beside)
    found = shutil.which("accelerate")
    if not found:
        pytest.skip("no `accelerate` executable next to the interpreter or on PATH")
    return found


def test_cpu_2proc_really_launches_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ)
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run(
        [_accelerate_bin(), "launch", "--config_file", str(_path("cpu_2proc")), str(script), str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], done.stderr[-4000:]
    for r in results:
        assert r["world_size"] == 2
        assert r["sum"] == 1.0  # 0 + 1
        assert r["backend"] == "gloo"
        assert r["distributed_type"] == "MULTI_CPU"
        assert r["num_processes"] == 2
        assert r["mixed_precision"] == "no"
