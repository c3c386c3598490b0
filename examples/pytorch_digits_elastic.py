"""Elastic training on scikit-learn's digits: survives workers dying and joining.

    horderun -np 2 --min-np 1 --max-np 4 python examples/pytorch_digits_elastic.py

Kill a worker (kill -9 PID): the survivors roll back to the last commit and go on.
Add one: horderun --join --rendezvous etcd://... --job NAME -np 1 python <this script>.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_data import digits_datasets, make_model, progress_bar  # noqa: E402

import elastic.torch as hvd  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05, help="per worker (scaled by size)")
    parser.add_argument("--commit-every", type=int, default=5, help="batches per commit")
    parser.add_argument("--step-delay", type=float, default=0.0,
                        help="seconds to sleep per step (to watch membership changes)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(args.seed)
    train_set, test_set = digits_datasets()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    sampler = hvd.elastic.ElasticSampler(train_set, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            x, y = test_set.tensors
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        model.train()
        return accuracy

    def on_reset() -> None:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * hvd.size()
        if hvd.rank() == 0:
            print(f"membership changed: now {hvd.size()} workers", flush=True)

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        for state.epoch in range(state.epoch, args.epochs + 1):  # noqa: B020 - Horovod idiom
            total = len(sampler)
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                hvd.record_loss(loss.item())  # Horde: the status page's loss chart
                optimizer.step()
                sampler.record_batch(state.batch, args.batch_size)
                state.batch += 1
                if args.step_delay:
                    time.sleep(args.step_delay)
                if state.batch % args.commit_every == 0:
                    state.commit()
            accuracy = evaluate()
            if hvd.rank() == 0:
                bar = progress_bar(state.epoch, args.epochs)
                print(f"epoch {state.epoch:2d}/{args.epochs} {bar} {hvd.size()} workers, "
                      f"{total} batches, test accuracy {accuracy:.2%}", flush=True)
            state.batch = 0
            sampler.set_epoch(state.epoch + 1)
            state.commit()

    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, sampler=sampler, epoch=1,
                                   batch=0)
    state.register_reset_callbacks([on_reset])
    train(state)
    if hvd.rank() == 0:
        print(f"final test accuracy: {evaluate():.2%}", flush=True)


if __name__ == "__main__":
    main()
