//! What a `model` name selects, and the list of names a client may use: the base model (embeddings), a
//! task (its rollout picks the generation), an alias or a generation id (pinned).

use super::Services;

/// What a `model` name selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selected {
    /// The base model: embeddings without an adapter.
    Base,
    /// A task: its rollout (or stable generation) answers.
    Task(String),
    /// A generation, by id or alias, pinned past any rollout.
    Pinned {
        /// The generation's task.
        task: String,
        /// The id or alias as given.
        reference: String,
    },
}

/// One name a client may put in `model`, with its lineage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCard {
    /// The name to send as `model`.
    pub id: String,
    /// Unix seconds: when the base model loaded, the task was created, the generation registered.
    pub created: u64,
    /// What this one derives from: a generation's parent generation (or its task when it has none), an
    /// alias's generation, a task's base model; none for the base model.
    pub parent: Option<String>,
    /// The base model everything here runs on.
    pub root: String,
    /// `base`, `task`, `alias` or `generation`.
    pub kind: &'static str,
    /// The task it classifies for; none for the base model.
    pub task: Option<String>,
}

impl Services {
    /// Whether `model` names the base model: its name, or a hub path ending in it
    /// (`sentence-transformers/all-MiniLM-L6-v2`).
    pub fn is_base_model(&self, model: &str) -> bool {
        let name = self.infer.model_name();
        model == name || model.rsplit_once('/').is_some_and(|(_, last)| last == name)
    }

    /// What `model` selects; `None` for a name nothing answers to. The base model's names come first,
    /// then tasks, then aliases and generation ids.
    pub fn select(&self, model: &str) -> Option<Selected> {
        if self.is_base_model(model) {
            return Some(Selected::Base);
        }
        if self.registry.task(model).is_some() {
            return Some(Selected::Task(model.to_owned()));
        }
        self.registry
            .resolve(model)
            .map(|generation| Selected::Pinned {
                task: generation.task.clone(),
                reference: model.to_owned(),
            })
    }

    /// Every name `model` accepts: the base model, each task, each alias that is not a task's name, each
    /// generation.
    pub fn model_cards(&self) -> Vec<ModelCard> {
        let root = self.infer.model_name().to_owned();
        let card = |id: String, created, parent, kind, task| ModelCard {
            id,
            created,
            parent,
            root: root.clone(),
            kind,
            task,
        };
        let mut cards = vec![card(root.clone(), self.loaded_at, None, "base", None)];
        let tasks = self.registry.tasks();
        for task in &tasks {
            cards.push(card(
                task.name.clone(),
                task.created_at,
                Some(root.clone()),
                "task",
                Some(task.name.clone()),
            ));
        }
        let mut generations = self.registry.list();
        generations.sort_by(|a, b| (a.0.created_at, &a.0.id).cmp(&(b.0.created_at, &b.0.id)));
        for (generation, aliases) in &generations {
            for alias in aliases {
                if !tasks.iter().any(|t| &t.name == alias) {
                    cards.push(card(
                        alias.clone(),
                        generation.created_at,
                        Some(generation.id.clone()),
                        "alias",
                        Some(generation.task.clone()),
                    ));
                }
            }
            let parent = generation
                .sidecar
                .parent
                .clone()
                .unwrap_or_else(|| generation.task.clone());
            cards.push(card(
                generation.id.clone(),
                generation.created_at,
                Some(parent),
                "generation",
                Some(generation.task.clone()),
            ));
        }
        cards
    }
}
