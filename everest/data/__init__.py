"""SHARP tables -> validated columns -> sample arrays; the synthetic generator; checks of a data folder."""
