"""Meta-learning algorithms, one module each: the trainer's contract and the paradigms' base classes are
`base.MetaLearner` (with `GradientLearner`, `SelfUpdating`, `FewShotLearner`), `metric.MetricLearner`,
`policy.PolicyLearner` and `l2o.LearnedOptimizer`."""
