"""Shared set-up for the entry points: logging, Ray init, data and model preparation."""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from r1omni_ray.config import ConfigError, RunConfig, load_config
from r1omni_ray.labels import label_set as named_label_set

log = logging.getLogger("r1omni_ray")


def setup_logging() -> None:
    # The driver imports DeepSpeed too (transformers' save_pretrained does, through accelerate): name its
    # accelerator on a machine without CUDA, as every actor does, instead of its warning in the job log.
    from actors.common import name_cpu_accelerator

    name_cpu_accelerator()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "deepspeed", "wandb", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not sys.stderr.isatty():  # progress bars only on an interactive terminal, transformers' too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML config (defaults: the tiny CPU demo)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. rollout.num_workers=4")
    return p


def parse_config(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}}
    addr = cfg.ray.address
    if addr in (None, "", "local"):
        # Inside `ray job submit` RAY_ADDRESS is set and we join that cluster; otherwise start locally.
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env=env, log_to_driver=True)
        else:
            from actors.placement import required_cpus

            # A private instance on this machine: Ray's "token authentication is enabled" notice on every
            # start says nothing here (RAY_AUTH_MODE must not be set now: Ray read it when imported).
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            # Logical CPUs are scheduling tokens: a small machine still runs the full actor layout.
            cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(required_cpus(cfg)) + 1)
            # address="local" always starts a private instance, never a `ray start` cluster found on the host.
            ray.init(address="local", num_cpus=cpus, runtime_env=env, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=addr, runtime_env=env)
    if _stop_handler_wanted:  # an entry point's process (not a library caller): Ray just replaced it
        install_stop_handler()


@dataclass
class Prepared:
    ckpt_dir: str
    train_path: str
    eval_path: str | None
    sft_path: str | None
    labels: list[str]


def resolve_labels(cfg: RunConfig) -> list[str]:
    if cfg.data.labels:
        return list(cfg.data.labels)
    if cfg.data.train_path is None:
        return list(cfg.data.synthetic.labels)
    return list(named_label_set(cfg.data.label_set))


def prepare(cfg: RunConfig, init_ckpt: str | None = None) -> Prepared:
    """Synthetic data when no dataset is given; a tiny random model when no checkpoint is given (neither
    model.path nor init_ckpt). Needs no Ray: entry points call it before Ray starts."""
    out = Path(cfg.train.output_dir)
    labels = resolve_labels(cfg)
    train, ev, sft = cfg.data.train_path, cfg.data.eval_path, cfg.data.sft_path
    if train is None:
        from r1omni_ray.tiny.synthetic import make_synthetic_dataset

        syn = cfg.data.synthetic
        d = out / "data"
        if not (d / "train.json").exists():
            log.info("writing synthetic omni emotion data to %s", d)
            make_synthetic_dataset(d, syn.num_train, labels=labels, seed=syn.seed, prefix="train")
            make_synthetic_dataset(d, syn.num_eval, labels=labels, seed=syn.seed + 1, prefix="eval")
            make_synthetic_dataset(d, syn.num_sft, labels=labels, seed=syn.seed + 2, prefix="sft", with_reasoning=True)
        train, ev, sft = str(d / "train.json"), str(d / "eval.json"), str(d / "sft.json")
    ckpt = init_ckpt or cfg.model.path
    if ckpt is None:
        from r1omni_ray.tiny.synthetic import SYNTHETIC_VOCAB_TEXTS

        fam = cfg.model.policy_family(None)
        ckpt_path = out / "init_model"
        if not (ckpt_path / "model.safetensors").exists():
            log.info("building a tiny random-init %s checkpoint in %s", fam.name, ckpt_path)
            fam.make_tiny(ckpt_path, tuple(SYNTHETIC_VOCAB_TEXTS), cfg.train.seed, cfg.model.tiny_hidden_size,
                          cfg.model.tiny_layers)
        ckpt = str(ckpt_path)
    return Prepared(str(Path(ckpt).resolve()), str(Path(train).resolve()),
                    str(Path(ev).resolve()) if ev else None, str(Path(sft).resolve()) if sft else None, labels)


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


_stop_handler_wanted = False


def install_stop_handler() -> None:
    """`ray job stop` sends SIGTERM: unwind through the finally blocks (actors, placement groups, W&B) and
    exit with one line. ray.init installs its own fatal-signal handler (a stack dump, then abort), so
    init_ray installs this one again after it."""
    global _stop_handler_wanted
    _stop_handler_wanted = True
    signal.signal(signal.SIGTERM, _stop)


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that resumes this run: the same module and arguments, with --resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    keep: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--resume", "--overwrite"):
            continue
        elif a == "--resume-from":
            skip = True
        elif not a.startswith("--resume-from="):
            keep.append(a)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    entry = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return shlex.join([*entry, *keep, "--resume"])


def run_main(main: Callable[[], int], resumable: bool = False) -> None:
    """Entry-point wrapper: configuration and data errors end the process with their message (which
    names the file/field) and exit status 2, not a traceback; an actor that died or failed in a role group
    ends it with one line naming the actor (and, for a resumable run, the command that resumes it)."""
    from actors.calls import ActorCallError
    from r1omni_ray.data.errors import DataError

    install_stop_handler()
    try:
        code = main()
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except ActorCallError as e:
        cause = (str(e.cause).strip().splitlines() or [""])[0]
        hint = f"; resume from the last committed checkpoint with: {resume_command()}" if resumable else ""
        print(f"error: {e.actor} failed in {e.method} ({type(e.cause).__name__}: {cause}){hint}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt as e:
        print(f"stopped ({e or 'SIGINT'}); the last committed checkpoint can be resumed with --resume", file=sys.stderr)
        code = 130
    sys.exit(code)
