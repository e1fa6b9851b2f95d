"""Worker code for the multi-process tests (started by ``torch.multiprocessing`` or ``torchrun``)."""
