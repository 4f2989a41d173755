"""Text handling for the default voice: normalisation of LLM output and clause segmentation."""
