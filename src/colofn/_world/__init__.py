"""Worlds: the simulated (threads) and real (torch.distributed processes) execution backends."""
