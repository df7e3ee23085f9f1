"""Callbacks that change training (batch size, loader settings, validation schedule); each says what it changes."""
