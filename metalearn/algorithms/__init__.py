"""Meta-learning algorithms: one module each, all subclasses of `MetaAlgorithm`."""
