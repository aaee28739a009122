"""Training, evaluation and batch extraction. models/, index/ and collection/ never import this."""
