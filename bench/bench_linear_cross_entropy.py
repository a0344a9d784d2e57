"""linear_cross_entropy: fusedloss vs torch's reference path, torch's chunked
path (torch >= 2.14), three GEMMs of the same shapes, and Liger on CUDA."""

from _runner import run_loss

if __name__ == "__main__":
    run_loss("linear_cross_entropy")
