"""Train a tiny MLP with a real DeepSpeed engine on CPU and save with engine.save_checkpoint; print one JSON line.

One process, world size 1, DS_ACCELERATOR=cpu, a gloo process group, a client torch.optim.AdamW (so no DeepSpeed
optimizer op is built). DeepSpeed's TorchBackend JIT-compiles its deepspeed_shm_comm C++ op (ninja + c++, ~36 s
cold) whenever it is created; nothing in DeepSpeed's config or environment turns that off. This script replaces
deepspeed.comm.torch.build_shm_op with a function returning None, DeepSpeed's own fallback when the op is not
compatible, so no compiler is needed and nothing is built (--allow-shm-build restores the original behaviour).

Layout written by save_checkpoint(save_dir) (tag global_step<N>), in this order:
    save_dir/global_step<N>/mp_rank_00_model_states.pt  (stage 3: zero_pp_rank_0_mp_rank_00_model_states.pt)
    save_dir/global_step<N>/zero_pp_rank_0_mp_rank_00_optim_states.pt  (stage >= 1; "bf16_" prefix with --bf16)
    save_dir/zero_to_fp32.py, save_dir/zero_to_torch.py  (stage >= 1)
    save_dir/latest  (the tag, no newline; written last)

--resume-dir DIR loads with engine.load_checkpoint(DIR, tag=--resume-tag or None, which reads DIR/latest), checks
global_steps, the client state and AdamW's step counter, then trains on to --steps. Batches depend only on the
step number, so a resumed run repeats the losses of an uninterrupted one.

Exits 3 without output on stdout when deepspeed is not importable (a test should skip then).

Examples:
    python tests/trainers/deepspeed_engine.py --save-dir out --steps 6 --save-every 2
    python tests/trainers/deepspeed_engine.py --save-dir out --steps 8 --save-every 2 --resume-dir out
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

NO_DEEPSPEED = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def adam_step(optimizer: Any) -> int | None:
    """AdamW's 'step' counter; DeepSpeed's ZeRO optimizers keep the torch optimizer in .optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(inner, "state", {}).values():
        if isinstance(state, dict) and "step" in state:
            return int(state["step"])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save-dir", required=True, type=Path, help="engine.save_checkpoint(save_dir)")
    p.add_argument("--steps", type=int, default=4, help="train until this global step")
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("--bf16", action="store_true", help="bf16 training (ZeRO files get a bf16_ prefix)")
    p.add_argument("--resume-dir", type=Path, default=None, help="engine.load_checkpoint(resume_dir, tag)")
    p.add_argument("--resume-tag", default=None, help="tag to load (default: what resume_dir/latest names)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each optimizer step")
    p.add_argument("--allow-shm-build", action="store_true", help="let DeepSpeed JIT-build deepspeed_shm_comm")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    os.environ["DS_ACCELERATOR"] = "cpu"
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))

    import torch

    if importlib.util.find_spec("deepspeed") is None:
        print(f"deepspeed is not installed for {sys.executable}", file=sys.stderr)
        return NO_DEEPSPEED
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its banner and config to stdout
        import deepspeed

        if not a.allow_shm_build:
            # deepspeed.comm's star imports rebind the name deepspeed.comm.torch to torch itself, so patch the
            # submodule through sys.modules; TorchBackend.__init__ looks build_shm_op up in this module's globals.
            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")

        torch.manual_seed(a.seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config: dict[str, Any] = {
            "train_batch_size": 8,
            "zero_optimization": {"stage": a.zero_stage},
            "steps_per_print": 10_000,
            "wall_clock_breakdown": False,
        }
        if a.bf16:
            config["bf16"] = {"enabled": True}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        dtype = torch.bfloat16 if a.bf16 else torch.float32

        resumed: dict[str, Any] | None = None
        losses: list[float] = []
        if a.resume_dir is not None:
            load_path, client_state = engine.load_checkpoint(str(a.resume_dir), tag=a.resume_tag)
            client_state = client_state or {}
            losses = list(client_state.get("losses", []))
            optimizer_step = adam_step(engine.optimizer)
            resumed = {
                "load_path": load_path,
                "global_steps": engine.global_steps,
                "client_state": {k: client_state.get(k) for k in ("my_step", "epoch")},
                "optimizer_step": optimizer_step,
                "optimizer_state_restored": optimizer_step is not None and optimizer_step == engine.global_steps > 0,
            }

        saves: list[dict[str, Any]] = []
        t0 = time.time()
        while engine.global_steps < a.steps:
            step = engine.global_steps
            gen = torch.Generator().manual_seed(a.seed * 100_003 + step)
            x, y = torch.randn(8, 8, generator=gen).to(dtype), torch.randn(8, 4, generator=gen).to(dtype)
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            losses.append(round(loss.float().item(), 6))
            if a.step_sleep > 0:
                time.sleep(a.step_sleep)
            if engine.global_steps % a.save_every == 0 or engine.global_steps == a.steps:
                client = {"my_step": engine.global_steps, "epoch": 0, "losses": losses}
                engine.save_checkpoint(str(a.save_dir), client_state=client)
                tag = f"global_step{engine.global_steps}"
                saves.append(
                    {"step": engine.global_steps, "tag": tag, "path": str(a.save_dir / tag), "time": time.time()}
                )
        seconds = round(time.time() - t0, 3)

    from torch.utils.cpp_extension import get_default_build_root

    ext = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    latest = a.save_dir / "latest"
    report = {
        "trainer": "deepspeed",
        "deepspeed": deepspeed.__version__,
        "torch": torch.__version__,
        "zero_stage": a.zero_stage,
        "save_dir": str(a.save_dir),
        "tags": sorted(
            (q.name for q in a.save_dir.glob("global_step*") if q.is_dir()), key=lambda n: int(n[len("global_step") :])
        )
        if a.save_dir.is_dir()
        else [],
        "latest": latest.read_text() if latest.is_file() else None,
        "files": sorted(str(q.relative_to(a.save_dir)) for q in a.save_dir.rglob("*") if q.is_file())
        if a.save_dir.is_dir()
        else [],
        "saves": saves,
        "global_steps": engine.global_steps,
        "final_optimizer_step": adam_step(engine.optimizer),
        "resumed": resumed,
        "losses": losses,
        "shm_op_built": any(ext.glob("**/deepspeed_shm_comm*")) if ext.is_dir() else False,
        "seconds": seconds,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
