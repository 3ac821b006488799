"""The model itself: config, layer slices, adapter, drafting round, statistics, CPU kernels, checkpoint I/O, PEFT and
the one module that touches transformers' private generation API (`compat`). Imports nothing outside `core/`; the
remote code is generated from it."""
