"""Real, offline data: readers for Debian-packaged corpora (WordNet, ...)."""
