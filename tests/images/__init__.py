"""The Dockerfiles and .dockerignore: checked on their text, and by importing what each image
needs."""
