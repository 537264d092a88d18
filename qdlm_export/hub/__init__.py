"""Publishing: push to the Hugging Face Hub and the generated model card."""
