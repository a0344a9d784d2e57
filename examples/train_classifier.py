"""Train one small model twice, with torch's losses and with fusedloss's, and
compare the loss curves and the step times.

The model is an MLP with a 32000-way softmax head (the shape of a language
model's output layer) and a 1000-way multi-label head, trained with SGD on a
synthetic task: inputs from a fixed random distribution, targets from a fixed
random "teacher" network. Both runs start from the same weights and see the
same batches, so their loss curves should agree to rounding, while the
fusedloss run spends less time in the losses.

    python examples/train_classifier.py [--steps 40] [--device cpu|cuda] [--plot curves.png]

Runs in well under 2 minutes on a 2-core CPU.
"""

import argparse
import statistics
import time

import torch

import fusedloss


class Model(torch.nn.Module):
    def __init__(self, features=128, hidden=64, vocab=32000, labels=1000):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.GELU(), torch.nn.LayerNorm(hidden))
        self.vocab_head = torch.nn.Linear(hidden, vocab)
        self.label_head = torch.nn.Linear(hidden, labels)

    def forward(self, x):
        h = self.body(x)
        return self.vocab_head(h), self.label_head(h)


def batches(steps, batch, features, vocab, labels, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher_vocab = torch.randn(features, vocab, generator=g) / features**0.5
    teacher_labels = torch.randn(features, labels, generator=g) / features**0.5
    for _ in range(steps):
        x = torch.randn(batch, features, generator=g)
        cls = (x @ teacher_vocab + 0.5 * torch.randn(batch, vocab, generator=g)).argmax(dim=1)
        multi = (x @ teacher_labels > 1.0).float()
        yield x.to(device), cls.to(device), multi.to(device)


def train(losses, steps, batch, device, seed=0):
    torch.manual_seed(seed)
    model = Model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ce, bce = losses
    curve, times = [], []
    for x, cls, multi in batches(steps, batch, 128, 32000, 1000, device, seed):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, label_logits = model(x)
        loss = ce(logits, cls) + 0.5 * bce(label_logits, multi)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        curve.append(loss.item())
    return curve, times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--plot", help="save the two loss curves as a PNG (needs matplotlib)")
    args = ap.parse_args()

    runs = {
        "torch": (torch.nn.CrossEntropyLoss(label_smoothing=0.1), torch.nn.BCEWithLogitsLoss()),
        "fusedloss": (fusedloss.nn.CrossEntropyLoss(label_smoothing=0.1), fusedloss.nn.BCEWithLogitsLoss()),
    }
    results = {name: train(losses, args.steps, args.batch, args.device) for name, losses in runs.items()}
    (c_t, t_t), (c_f, t_f) = results["torch"], results["fusedloss"]

    print(f"{'step':>5} {'torch loss':>12} {'fusedloss loss':>15} {'|diff|':>10}")
    for i in list(range(0, args.steps, max(1, args.steps // 8))) + [args.steps - 1]:
        print(f"{i:>5} {c_t[i]:>12.6f} {c_f[i]:>15.6f} {abs(c_t[i] - c_f[i]):>10.2e}")
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(c_t, c_f, strict=True))
    # the first steps include warm-up (allocator, caches): compare the rest
    med_t, med_f = statistics.median(t_t[3:]), statistics.median(t_f[3:])
    print(f"\nloss curves: largest relative difference {worst:.2e} over {args.steps} steps")
    print(
        f"median step time on {args.device}: torch {med_t * 1e3:.1f} ms, fusedloss {med_f * 1e3:.1f} ms "
        f"({med_t / med_f:.2f}x faster)"
    )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.plot(c_t, label="torch losses")
        plt.plot(c_f, "--", label="fusedloss losses")
        plt.xlabel("step")
        plt.ylabel("training loss")
        plt.legend()
        plt.savefig(args.plot, dpi=100)
        print(f"curves saved to {args.plot}")
    if worst > 1e-3:
        raise SystemExit("the loss curves disagree")


if __name__ == "__main__":
    main()
