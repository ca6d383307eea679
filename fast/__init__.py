"""The speed paths: fused or re-laid-out copies of the reference, each tied to it by a test.

spiral_trainer.py  spiral.train_reference for many MLPs at once (fused, batched, tiled)
workers.py         worker processes that spread independent jobs over the CPU cores
mlp_spectra.py     the spectra tracker's fused Hessian- and NTK-vector products
layers.py          the Myrtle5 layer table with our CUDA kernels (models.LAYERS' signatures)
gpu.py, kernels/   the CUDA kernels and their launchers (CuPy)

Nothing in the top-level core imports from here; the commands choose (``--reference`` trains
with the core's loop instead).
"""
