"""The paper's figures from a RealNVP in memory (grids first; the figure functions follow)."""
