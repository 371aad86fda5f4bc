"""Scale a running RLVR job's rollout workers: ``python -m launch.scale --address <ray> --run <name>
--rollout-workers N``. The driver applies the request at its next step boundary and answers with the state
it applied (new workers then join once placed and loaded) or a one-line reason it could not. Without
--rollout-workers, prints the run's current state."""

from __future__ import annotations

import argparse
import sys
import time

import ray

from actors.scale_control import NAMESPACE, channel_name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--address", default="auto", help="the Ray cluster (GCS address host:port, or auto)")
    p.add_argument("--run", required=True, help="the run's name (wandb.run_name, else train.output_dir's last part)")
    p.add_argument("--rollout-workers", type=int, default=None, help="the number of rollout workers to go to")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the driver's answer")
    p.add_argument("--wait-joined", action="store_true", help="after the answer, wait until that many workers are active")
    args = p.parse_args(argv)
    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
    try:
        ctl = ray.get_actor(channel_name(args.run), namespace=NAMESPACE)
    except ValueError:
        live = sorted(a["name"].removeprefix("scale:") for a in ray.util.list_named_actors(all_namespaces=True)
                      if a.get("namespace") == NAMESPACE and a["name"].startswith("scale:"))
        print(f"error: no run named {args.run!r} on this cluster (live runs: {live or 'none'})", file=sys.stderr)
        return 2
    if args.rollout_workers is None:
        print(ray.get(ctl.state.remote()))
        return 0
    rid = ray.get(ctl.request.remote(args.rollout_workers))
    deadline = time.monotonic() + args.timeout
    while (ans := ray.get(ctl.result.remote(rid))) is None:
        if time.monotonic() > deadline:
            print(f"error: no answer within {args.timeout:g}s (the request stays queued for the next step boundary)",
                  file=sys.stderr)
            return 2
        time.sleep(0.5)
    ok, text = ans
    print(text if ok else f"error: {text}", file=sys.stdout if ok else sys.stderr)
    if ok and args.wait_joined:
        while (st := ray.get(ctl.state.remote())).get("active") != args.rollout_workers:
            if time.monotonic() > deadline:
                print(f"error: {st} after {args.timeout:g}s", file=sys.stderr)
                return 2
            time.sleep(0.5)
        print(f"joined: {st}")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
