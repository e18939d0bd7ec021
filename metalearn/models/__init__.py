"""Plain nn.Modules, unaware of meta-learning."""
