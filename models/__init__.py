"""Neural models: SCAN (stacked cross attention) and the region extractor. No web or database code here."""
