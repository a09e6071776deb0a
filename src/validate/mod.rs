pub mod external;
pub mod hygiene;
pub mod injection;
pub mod oip;
pub mod ood;
pub mod openai;
pub mod params;
pub mod stage;
