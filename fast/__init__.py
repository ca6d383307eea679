"""The speed paths: fused or re-laid-out copies of the reference, each tied to it by a test.

spiral_trainer.py  spiral.train_reference for many MLPs at once (fused, batched, tiled)
mlp_spectra.py     the spectra tracker's fused Hessian- and NTK-vector products
myrtle5.py         models.py's Myrtle5 with fused layers, through a layer table (CPU_LAYERS)
layers.py          that table with our CUDA kernels where they apply (GPU_LAYERS)
gpu.py, kernels/   the CUDA kernels and their launchers (CuPy)

Nothing in the top-level core imports from here; the commands import it only where they use it
(``--reference`` trains with the core's loop and loads nothing from here).
"""
