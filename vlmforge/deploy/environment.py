"""What a runner's processes get of the deployer's environment: an explicit allow-list, never secrets.

Open MPI gives the ranks it starts on this host mpirun's whole environment, and ``mpirun -x NAME`` copies NAME to
the ranks on other hosts. So the process launcher starts mpirun (or the runner alone, for TP 1) with a new
environment made here, and forwards with ``-x`` only the names the ranks need:

- :data:`RUNNER_NAMES` and the tuning families of :data:`RUNNER_PREFIXES`: the interpreter and its paths, offline
  Hugging Face settings and caches, tokenizer threads, log levels, and the CUDA, NCCL, OpenMP, MKL and torch knobs;
- never a name that looks like a secret (:data:`SECRET_WORDS`), even in those families; never ``AWS_*`` (the
  runner reads its engine from a local directory, not from the store) or ``HF_TOKEN`` (it reaches no hub);
- mpirun itself also gets :data:`LAUNCHER_NAMES` and Open MPI's own settings (:data:`LAUNCHER_PREFIXES`), and
  ``SSH_AUTH_SOCK`` when a hostfile makes it start ranks on other hosts; these are not forwarded with ``-x``;
- the API key (:data:`vlmforge.deploy.auth.API_KEY_ENV`) goes to rank 0 alone (see
  :func:`vlmforge.deploy.launchers.process.launch_argv`).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import SecretStr

from vlmforge.deploy.auth import API_KEY_ENV

RUNNER_NAMES = frozenset({
    "PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "HOME", "PYTHONWARNINGS", "PYTHONUNBUFFERED",
    "TOKENIZERS_PARALLELISM", "HF_HOME", "HF_HUB_CACHE", "HF_MODULES_CACHE", "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_CACHE",
    "VLMFORGE_LOG_LEVEL", "VLMFORGE_TRTLLM_ROOT",
})
"""Variables every rank gets (and ranks on other hosts through ``mpirun -x``), where the deployer has them."""
RUNNER_PREFIXES = ("CUDA_", "NCCL_", "OMP_", "MKL_", "TORCH_", "TORCHINDUCTOR_")
"""Families of tuning knobs every rank gets (a name with a :data:`SECRET_WORDS` word excepted)."""
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "KEY")
"""A name holding one of these words is never given to a rank through a prefix family."""
LAUNCHER_NAMES = frozenset({"USER", "LOGNAME", "TMPDIR", "LANG", "LC_ALL", "OMPI_ALLOW_RUN_AS_ROOT",
                            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"})
"""What mpirun itself uses (its local ranks see these too; they are not forwarded to other hosts)."""
LAUNCHER_PREFIXES = ("OMPI_MCA_", "PMIX_MCA_", "PRTE_MCA_")
"""Open MPI's own settings, for mpirun."""


def runner_variable(name: str) -> bool:
    """Whether a rank may get the deployer's variable ``name``."""
    if name in RUNNER_NAMES:
        return True
    return name.startswith(RUNNER_PREFIXES) and not any(word in name.upper() for word in SECRET_WORDS)


def forwarded(env: Mapping[str, str]) -> list[str]:
    """The names of ``env`` that ``mpirun -x`` copies to the ranks (sorted; never the API key)."""
    return sorted(name for name in env if runner_variable(name))


def launch_environment(env: Mapping[str, str], *, mpi: bool, hostfile: bool = False,
                       api_key: SecretStr | None = None) -> dict[str, str]:
    """The environment the launcher is started with: the runner's variables of ``env``, mpirun's own (``mpi``;
    ``SSH_AUTH_SOCK`` with a ``hostfile``), and the API key, if given (rank 0 keeps it; the others drop it)."""
    out = {name: value for name, value in env.items() if runner_variable(name)}
    if mpi:
        out.update({name: value for name, value in env.items()
                    if name in LAUNCHER_NAMES or name.startswith(LAUNCHER_PREFIXES)})
        if hostfile and "SSH_AUTH_SOCK" in env:
            out["SSH_AUTH_SOCK"] = env["SSH_AUTH_SOCK"]
    if api_key is not None:
        out[API_KEY_ENV] = api_key.get_secret_value()
    return out


CONTAINER_PREFIXES = ("NCCL_", "OMP_", "MKL_", "TORCH_", "TLLM_", "TRTLLM_")
"""Tuning knobs a container of another image (NVIDIA's release image) gets from the deployer."""
HOST_ONLY_WORDS = ("DIR", "PATH", "HOME", "CACHE", "VISIBLE_DEVICES")
"""Names holding one of these are this host's paths or GPU numbering, wrong inside a container (the daemon picks
its GPUs): never given to one."""
CONTAINER_FIXED = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                   "TOKENIZERS_PARALLELISM": "false"}
"""What every runner container from another image is started with: it loads a local folder and reaches no hub."""


def container_variable(name: str) -> bool:
    """Whether a container of another image may get the deployer's variable ``name``."""
    upper = name.upper()
    return (name.startswith(CONTAINER_PREFIXES) and not any(word in upper for word in SECRET_WORDS)
            and not any(word in upper for word in HOST_ONLY_WORDS))


def container_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment of a runner container from another image: :data:`CONTAINER_FIXED` and the deployer's tuning
    knobs of :data:`CONTAINER_PREFIXES` (no secrets, no host paths); never its PATH, Python or library paths."""
    return {**{name: value for name, value in sorted(env.items()) if container_variable(name)}, **CONTAINER_FIXED}
