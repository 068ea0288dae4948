"""`specmesh bench image`: images/s, accepted length, class accuracy and Frechet distance per
decoding method (ar, exact_sd, lantern, gsd), all measured in one run, plus LANTERN's trade-off
as delta varies."""
