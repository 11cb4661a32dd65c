"""Language-modelling tasks (suite ``lm``): WikiText-2 perplexity."""
