// Intentionally empty: CBLAS only declares the OpenBLAS prototypes in include/.
