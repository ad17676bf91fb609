"""The pruning engine for any CNN: units from the dependency graph, analytic sizes, shapes."""
