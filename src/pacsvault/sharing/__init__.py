"""Share links for an outside colleague (issue 19, part 2): ``links`` holds the rule."""
