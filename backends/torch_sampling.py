"""(family module: ops are declared as the family is built)."""
