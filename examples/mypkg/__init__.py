"""An outside package with one pruning method (docs/methods.md, "Adding a method")."""
