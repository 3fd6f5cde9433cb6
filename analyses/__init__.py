"""kcs_lens.analyses: comparisons of subnetworks with activation patching, attribution and circuitsvis views."""
