"""Analysis of a trained model: feature embeddings (t-SNE / UMAP), SHAP, the HTML report."""
