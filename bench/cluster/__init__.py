"""The cluster benchmark: one node agent with hundreds of VMIs on its node, real apiserver."""
