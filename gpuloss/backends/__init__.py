"""The backends: they only compute a checked call (`gpuloss._call.Call`).

`numpy` (blocked, multi-threaded NumPy), `cuda` (the fused kernels through CuPy) and `generic`
(whole-array formulas for any array-API namespace). Each imports `gpuloss._call` and nothing
else of gpuloss; `gpuloss._dispatch` picks one per call.
"""
