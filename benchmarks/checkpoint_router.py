"""Write the router of a training run's last epoch as a router folder.

`train_router` keeps the epoch with the best dev MRR; this writes the one its checkpoint stopped at instead,
e.g. to measure what training did when early stopping kept the starting router:

    python -m benchmarks.checkpoint_router runs/stop17/router-pq-hotpotqa-train runs/stop17/router-pq-hotpotqa-ep2 \
        --like msa_plugins/routers/smollm2-135m-v4
"""

from __future__ import annotations

import argparse

from msa_plugins.trainer import Router, last_epoch_router


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work_dir", help="the training's checkpoint folder (train_default_router.py --work-dir)")
    ap.add_argument("out", help="router folder to write")
    ap.add_argument("--like", required=True, help="a router of the same shapes (the one training started from)")
    args = ap.parse_args(argv)
    router = last_epoch_router(args.work_dir, Router.load(args.like))
    print(router.meta["weights"], [(h["epoch"], h.get("dev_mrr")) for h in router.meta["history"]])
    router.save(args.out)


if __name__ == "__main__":
    main()
