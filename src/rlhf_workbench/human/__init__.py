"""Human feedback: accounts, items and claims, rankings and their consumption, adjudication, pairwise, selection, agreement, drift, guidelines, export."""
