"""The plan's vocabulary and the plan itself: torch-free types shared by the planner and the runtime."""
