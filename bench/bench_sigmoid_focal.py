"""sigmoid_focal: fusedloss vs torch eager vs torch.compile."""

from _runner import run_loss

if __name__ == "__main__":
    run_loss("sigmoid_focal")
