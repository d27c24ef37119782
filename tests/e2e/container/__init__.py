"""Containers for the e2e tests: podman set up for this machine, and an
offline `python:3.11-slim` base image built with debootstrap."""
