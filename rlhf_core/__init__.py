"""rlhf_core: the math of RLHF (losses, advantages, KL estimators) as pure torch functions."""
