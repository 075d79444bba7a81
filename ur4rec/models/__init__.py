"""Models: the SASRec backbone, scoring and losses."""
