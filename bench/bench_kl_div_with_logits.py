"""kl_div_with_logits: fusedloss vs torch eager vs torch.compile."""

from _runner import run_loss

if __name__ == "__main__":
    run_loss("kl_div_with_logits")
